"""Native resolution, checkpoint side: a native encoder (aimv2.models.native: 2-D sin-cos positions,
any grid) loads as one from this project's pre-training checkpoint, its `aimv2` export and a
transformers `is_native` directory; it exports to transformers as `is_native` (plain transformers
gives its features on a non-square image) and to timm as a learned table at the nominal grid (exact
there only; the deviation timm's resampling gives elsewhere is measured here). Tiny random models,
real files, real timm and transformers."""

from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
import transformers
from safetensors.torch import load_file, safe_open

from aimv2 import load_encoder
from aimv2.checkpoints import detect_format, load_checkpoint
from aimv2.checkpoints.arch import TimmRecipe, recipe_from_size
from aimv2.cli import main
from aimv2.errors import UserError
from aimv2.models import AIMv2, get_size
from aimv2.models.native import build_native_encoder, grid_position_embedding, is_native

SPEC = get_size("debug")
NOMINAL = 224  # the pre-training default: a 16 x 16 nominal grid
IMAGES = torch.randn(2, 3, 70, 126, generator=torch.Generator().manual_seed(0))  # a 5 x 9 grid
# timm's export at 70 x 126 px, measured with these seeds (deterministic): max |features - native| 2.778 (mean
# 0.308; features have RMS 1.04, a 42 % per-token error), max |table - sin-cos| 1.961 (mean 0.216; the table lies
# in [-1, 1]). Resampling stretches the 16 x 16 table over the 5 x 9 grid, where the native encoder takes the
# table's first 5 x 9 entries: it is another position encoding, not an approximation of the native one.
TIMM_FEATURE_DEVIATION = (2.7, 2.85)
TIMM_TABLE_DEVIATION = (1.95, 1.97)


def _features(encoder, images=IMAGES) -> torch.Tensor:
    with torch.no_grad():
        return encoder.forward_features(images)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def _save_pretraining_ckpt(path, model: AIMv2, model_cfg: dict) -> None:
    """The layout `aimv2 pretrain` writes: the module's state dict under `model.` + hyper_parameters."""
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "global_step": 3,
            "hyper_parameters": {"model": model_cfg, "vocab_size": 50, "max_text_len": 8},
        },
        path,
    )


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(pre-training .ckpt of a random native debug model, its encoder, its features on IMAGES)."""
    root = tmp_path_factory.mktemp("native")
    torch.manual_seed(0)
    model = AIMv2(SPEC, NOMINAL, 50, max_text_len=8, native=True).eval()
    with torch.no_grad():  # random norm weights too, so a swapped norm would show
        for name, p in model.encoder.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ckpt = root / "last.ckpt"
    _save_pretraining_ckpt(ckpt, model, {"size": "debug", "img_size": NOMINAL, "native": True})
    return ckpt, model.encoder, _features(model.encoder)


@pytest.fixture(scope="module")
def exports(native, tmp_path_factory):
    root = tmp_path_factory.mktemp("native_exports")
    outs = {fmt: root / fmt for fmt in ("aimv2", "hf", "timm")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fmt, out in outs.items():
            assert main(["export", str(native[0]), "--format", fmt, "--out", str(out)]) == 0
    timm_warnings = [str(w.message) for w in caught if "timm format" in str(w.message)]
    return outs, timm_warnings


def test_native_pretraining_checkpoint_loads_as_a_native_encoder(native):
    ckpt, _, reference = native
    assert detect_format(ckpt) == "lightning"
    loaded = load_checkpoint(ckpt)
    assert is_native(loaded.encoder) and loaded.recipe.native and loaded.encoder.pos_embed is None
    assert loaded.preprocessing.img_size == NOMINAL and loaded.trained_size == NOMINAL
    assert _max_diff(_features(loaded.encoder), reference) == 0.0
    assert _features(loaded.encoder, torch.randn(1, 3, 42, 28)).shape == (1, 6, 64)  # any grid


def test_config_and_weights_that_disagree_about_native_are_one_line_errors(native, tmp_path):
    """An old checkpoint has no `native` key (= False): native weights there, or fixed-size weights under
    `native: true`, name the one key that differs and what it means."""
    _, encoder, _ = native
    torch.manual_seed(0)
    fixed = AIMv2(SPEC, 56, 50, max_text_len=8)
    native_model = AIMv2.from_parts(encoder, fixed.decoder)
    _save_pretraining_ckpt(tmp_path / "old.ckpt", native_model, {"size": "debug", "img_size": NOMINAL})
    with pytest.raises(UserError, match=r"missing 1 keys \[pos_embed\]; .*native-resolution encoder's") as err:
        load_encoder(tmp_path / "old.ckpt")
    assert "old.ckpt" in _one_line(err)
    _save_pretraining_ckpt(tmp_path / "liar.ckpt", fixed, {"size": "debug", "img_size": 56, "native": True})
    with pytest.raises(UserError, match=r"unexpected 1 keys \[pos_embed\]; the config says native") as err:
        load_encoder(tmp_path / "liar.ckpt")
    _one_line(err)


def test_a_native_recipe_builds_what_build_native_encoder_builds():
    recipe = recipe_from_size(SPEC, 56, native=True)
    assert TimmRecipe(**json.loads(json.dumps(recipe.as_dict()))) == recipe  # survives config.json
    built, reference = recipe.build().eval(), build_native_encoder(SPEC, 56).eval()
    assert is_native(built) and built.dynamic_img_size
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in built.state_dict().items()} == shapes
    built.load_state_dict(reference.state_dict(), strict=True)
    assert _max_diff(_features(built), _features(reference)) == 0.0
    odd = TimmRecipe(recipe.name, recipe.kwargs | {"embed_dim": 66, "num_heads": 3}, native=True)
    with pytest.raises(UserError, match="width 66 is not divisible by 4") as err:
        odd.build()
    _one_line(err)


def test_aimv2_export_round_trip_keeps_native_resolution(native, exports):
    _, _, reference = native
    out = exports[0]["aimv2"]
    config = json.loads((out / "config.json").read_text())
    assert config["timm"]["native"] is True and config["timm"]["kwargs"]["img_size"] == NOMINAL
    assert "pos_embed" not in load_file(out / "encoder.safetensors")
    encoder, pre = load_encoder(out)
    assert is_native(encoder) and pre.img_size == NOMINAL
    assert torch.equal(_features(encoder), reference)


def test_hf_export_is_native_and_plain_transformers_gives_the_same_features(native, exports):
    _, _, reference = native
    out = exports[0]["hf"]
    config = json.loads((out / "config.json").read_text())
    assert config["is_native"] is True and config["use_head"] is False and config["image_size"] == NOMINAL
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "position" in k]
    hf = transformers.Aimv2VisionModel.from_pretrained(out).eval()
    with torch.no_grad():
        hidden = hf(pixel_values=IMAGES).last_hidden_state  # after the final RMSNorm, as forward_features
    assert _max_diff(hidden, reference) <= 1e-4
    encoder, _ = load_encoder(out)  # and back: a native encoder again
    assert is_native(encoder) and _max_diff(_features(encoder), reference) <= 1e-5


def test_transformers_native_model_loads_as_a_native_encoder(tmp_path):
    cfg = transformers.Aimv2VisionConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        use_head=False,
        is_native=True,
    )
    torch.manual_seed(1)
    model = transformers.Aimv2VisionModel(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    encoder, pre = load_encoder(tmp_path / "hf")
    assert is_native(encoder) and encoder.pos_embed is None and pre.img_size == 56
    with torch.no_grad():
        expected = model(pixel_values=IMAGES).last_hidden_state
    assert _max_diff(_features(encoder), expected) <= 1e-4


def test_timm_export_is_exact_at_the_nominal_size_only(native, exports):
    _, encoder, reference = native
    outs, timm_warnings = exports
    assert len(timm_warnings) == 1 and f"exact at {NOMINAL} px only" in timm_warnings[0]
    config = json.loads((outs["timm"] / "config.json").read_text())
    assert config["model_args"]["dynamic_img_size"] is True
    table = grid_position_embedding(16, 16, 64).reshape(1, 256, 64)
    assert torch.equal(load_file(outs["timm"] / "model.safetensors")["pos_embed"], table)
    plain = timm.create_model(f"local-dir:{outs['timm']}", pretrained=True).eval()
    square = torch.randn(2, 3, NOMINAL, NOMINAL, generator=torch.Generator().manual_seed(2))
    assert _max_diff(_features(plain, square), _features(encoder, square)) <= 1e-5
    # Off the nominal grid timm resamples the table (bicubic): the figures in TIMM_*_DEVIATION.
    low, high = TIMM_FEATURE_DEVIATION
    assert low < _max_diff(_features(plain), reference) < high
    resampled = timm.layers.resample_abs_pos_embed(table, new_size=(5, 9), old_size=(16, 16), num_prefix_tokens=0)
    low, high = TIMM_TABLE_DEVIATION
    assert low < _max_diff(resampled, grid_position_embedding(5, 9, 64).reshape(1, 45, 64)) < high


def test_img_size_moves_only_the_nominal_size_of_a_native_encoder(native, tmp_path):
    ckpt, _, reference = native
    encoder, pre = load_encoder(ckpt, img_size=84)
    assert pre.img_size == 84 and tuple(encoder.patch_embed.grid_size) == (6, 6)  # what compress reads
    assert _max_diff(_features(encoder), reference) == 0.0  # no table to resample: the same features
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf84"), "--img-size", "84"]) == 0
    config = json.loads((tmp_path / "hf84" / "config.json").read_text())
    assert config["image_size"] == 84 and config["is_native"] is True
    with pytest.raises(UserError, match="img_size=90 .*not a positive multiple of its patch size 14") as err:
        load_encoder(ckpt, img_size=90)
    assert "last.ckpt" in _one_line(err)
