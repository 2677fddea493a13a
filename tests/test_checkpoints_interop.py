"""Other people's layouts and bad inputs: Apple's ml-aim release keys and transformers'
Aimv2VisionModel (random models, built offline) load with features identical to the reference
implementation; format detection, mismatches, truncated files and a malicious pickle are one-line
errors that name the file, and the malicious pickle's code never runs."""

from __future__ import annotations

import io
import json
import pickle
import warnings

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from aimv2 import load_encoder
from aimv2.checkpoints import detect_format
from aimv2.checkpoints.convert import timm_to_apple
from aimv2.errors import UserError
from aimv2.models.encoder import build_encoder
from aimv2.models.sizes import get_size

TOL = 1e-5
IMAGES = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def timm_encoder():
    torch.manual_seed(0)
    encoder = build_encoder(get_size("debug"), 56).eval()
    with torch.no_grad():  # random norm weights too, so a swapped norm would show
        for name, p in encoder.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return encoder


def _tokens(encoder, images=IMAGES) -> torch.Tensor:
    with torch.no_grad():
        return encoder.forward_features(images)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_apple_layout_is_the_inverse_of_timms_filter(timm_encoder):
    sd = timm_encoder.state_dict()
    apple = timm_to_apple(sd)
    for key in (
        "preprocessor.pos_embed",
        "preprocessor.patchifier.proj.weight",
        "preprocessor.patchifier.proj.bias",
        "preprocessor.patchifier.norm.weight",
        "trunk.blocks.1.norm_1.weight",
        "trunk.blocks.1.attn.qkv.weight",
        "trunk.blocks.1.attn.proj.weight",
        "trunk.blocks.1.norm_2.weight",
        "trunk.blocks.1.mlp.fc1.weight",
        "trunk.blocks.1.mlp.fc2.weight",
        "trunk.blocks.1.mlp.fc3.weight",
        "trunk.post_trunk_norm.weight",
    ):
        assert key in apple, key  # the state dict keys of Apple's release (github.com/apple/ml-aim, aim-v2)
    assert len(apple) == len(sd)
    back = checkpoint_filter_fn(apple, timm_encoder)  # timm's own conversion of Apple's release
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_apple_release_layout_loads_with_timm_identical_features(timm_encoder, tmp_path, suffix):
    apple = {k: v.clone().contiguous() for k, v in timm_to_apple(timm_encoder.state_dict()).items()}
    path = tmp_path / f"aimv2_debug{suffix}"
    save_file(apple, path) if suffix == ".safetensors" else torch.save(apple, path)
    assert detect_format(path) == "apple"
    encoder, pre = load_encoder(path)  # architecture from the shapes, heads from the size table
    assert pre.img_size == 56
    assert (_tokens(encoder) - _tokens(timm_encoder)).abs().max().item() == 0.0


def _hf_model(**overrides) -> transformers.Aimv2VisionModel:
    cfg = (
        dict(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            use_head=False,
        )
        | overrides
    )
    torch.manual_seed(1)
    model = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 128},
        {"use_head": True},
        {"is_native": True},
    ],
    ids=["debug-dims", "dims-in-no-size-row", "lit-head-dropped", "native-resolution"],
)
def test_transformers_model_loads_with_identical_features(tmp_path, overrides):
    model = _hf_model(**overrides)
    model.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder, pre = load_encoder(tmp_path / "hf")
    assert any("attention-pooling head" in str(w.message) for w in caught) == bool(overrides.get("use_head"))
    with torch.no_grad():
        expected = model(pixel_values=IMAGES).last_hidden_state  # (2, 16, D)
    assert pre.img_size == 56
    assert (_tokens(encoder) - expected).abs().max().item() <= TOL


def test_bare_transformers_state_dict_and_weights_file_inside_a_directory(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    encoder, _ = load_encoder(tmp_path / "hf" / "model.safetensors")  # the file means its directory
    with torch.no_grad():
        expected = model(pixel_values=IMAGES).last_hidden_state
    assert (_tokens(encoder) - expected).abs().max().item() <= TOL
    torch.save(model.state_dict(), tmp_path / "hf_state.bin")  # no config: shapes + size table
    encoder, _ = load_encoder(tmp_path / "hf_state.bin")
    assert (_tokens(encoder) - expected).abs().max().item() <= TOL


def test_unknown_dims_need_heads(tmp_path):
    torch.manual_seed(0)
    odd = timm.create_model(
        "aimv2_large_patch14_224", embed_dim=48, depth=1, num_heads=4, mlp_ratio=2.0, img_size=28, num_classes=0
    ).eval()
    save_file(odd.state_dict(), tmp_path / "odd.safetensors")
    with pytest.raises(UserError, match="pass heads=N") as err:
        load_encoder(tmp_path / "odd.safetensors")
    assert "odd.safetensors" in _one_line(err)
    encoder, pre = load_encoder(tmp_path / "odd.safetensors", heads=4)
    images = torch.randn(1, 3, 28, 28)
    assert pre.img_size == 28 and torch.equal(_tokens(encoder, images), _tokens(odd, images))


def test_format_detection_errors_name_the_culprit(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*nope.ckpt"):
        load_encoder(tmp_path / "nope.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no known checkpoint layout") as err:
        detect_format(tmp_path / "empty")
    assert "empty" in _one_line(err)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="unknown kind .*'bert'") as err:
        detect_format(tmp_path / "other")
    _one_line(err)
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "mlp.safetensors")
    with pytest.raises(UserError, match="no known encoder weights .*fc.weight") as err:
        load_encoder(tmp_path / "mlp.safetensors")
    _one_line(err)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds a list"):
        load_encoder(tmp_path / "list.pt")


def test_mismatch_lists_missing_and_unexpected_keys(timm_encoder, tmp_path):
    sd = {k: v for k, v in timm_encoder.state_dict().items() if not k.startswith("blocks.1.")}
    sd["blocks.2.attn.qkv.weight"] = torch.zeros(192, 64)  # depth 3 now, but blocks.1 is gone
    for i in range(12):
        sd[f"extra.{i}"] = torch.zeros(1)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(UserError) as err:
        load_encoder(tmp_path / "bad.safetensors", heads=2)  # depth 3 matches no size-table row
    msg = _one_line(err)
    assert "bad.safetensors" in msg and "missing 13 keys [blocks.1.attn.proj.weight, " in msg
    assert "unexpected 12 keys" in msg and "(+7 more)" in msg  # long lists are cut to 5 names
    wide = dict(timm_encoder.state_dict())
    wide["norm.weight"] = torch.ones(65)
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(UserError, match=r"mis-shaped 1 keys \[norm.weight \(65,\) vs \(64,\)\]"):
        load_encoder(tmp_path / "wide.safetensors")


def test_truncated_files_are_one_line_errors(timm_encoder, tmp_path):
    save_file(timm_encoder.state_dict(), tmp_path / "full.safetensors")
    torch.save({"state_dict": timm_encoder.state_dict()}, tmp_path / "full.ckpt")
    for name in ("full.safetensors", "full.ckpt"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(UserError, match="truncated or corrupt") as err:
            load_encoder(cut)
        assert str(cut) in _one_line(err)


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates the marker file (arbitrary code, harmlessly)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_its_code_never_runs(timm_encoder, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": timm_encoder.state_dict(), "extra": _Payload(str(marker))}, evil)
    # The payload is live: a plain unpickling runs it.
    proof = tmp_path / "proof"
    buf = io.BytesIO()
    pickle.dump(_Payload(str(proof)), buf)
    pickle.loads(buf.getvalue())
    assert proof.exists()
    for call in (lambda: load_encoder(evil), lambda: detect_format(evil)):
        with pytest.raises(UserError, match="refused to load") as err:
            call()
        assert "evil.ckpt" in _one_line(err) and "open" in str(err.value)
    assert not marker.exists()


def test_ml_l3m_model_maps_onto_ours_tensor_for_tensor():
    """ml-l3m's AIMv2 names (as its InSeriesMetaModels state dict spells them, written out here by hand)
    land on this project's AIMv2: q/k/v stacked in that order, fc1 -> fc1_g (the gate), fc3 -> fc1_x, the
    caption position table cut to the rows a loss reads; nothing left over. eval/parity_l3m.py runs both
    trainers through this map."""
    from aimv2.checkpoints.convert import l3m_to_module
    from aimv2.models import AIMv2

    torch.manual_seed(0)
    ours = AIMv2(get_size("debug"), 56, vocab_size=30, max_text_len=8)
    target = ours.state_dict()
    enc, dec = "models.image_encoder.", "models.text_decoder."
    theirs: dict[str, torch.Tensor] = {}
    for part, prefix in (("encoder", enc), ("decoder", dec)):
        for i in range(2):
            q, k, v = target[f"{part}.blocks.{i}.attn.qkv.weight"].chunk(3)
            b = f"{prefix}trunk.blocks.{i}."
            theirs |= {
                b + "attn.q_proj.weight": q,
                b + "attn.k_proj.weight": k,
                b + "attn.v_proj.weight": v,
                b + "attn.proj.weight": target[f"{part}.blocks.{i}.attn.proj.weight"],
                b + "norm_1.weight": target[f"{part}.blocks.{i}.norm1.weight"],
                b + "norm_2.weight": target[f"{part}.blocks.{i}.norm2.weight"],
                b + "mlp.fc1.weight": target[f"{part}.blocks.{i}.mlp.fc1_g.weight"],
                b + "mlp.fc3.weight": target[f"{part}.blocks.{i}.mlp.fc1_x.weight"],
                b + "mlp.fc2.weight": target[f"{part}.blocks.{i}.mlp.fc2.weight"],
            }
        theirs[prefix + "trunk.post_trunk_norm.weight"] = target[f"{part}.norm.weight"]
    pre = enc + "preprocessor.blocks.0."
    text = dec + "preprocessor.text_preprocessor."
    extra_row = torch.randn(1, target["decoder.text_pos_embed"].shape[-1])  # context_length + 1 rows in theirs
    theirs |= {
        pre + "pos_embed": target["encoder.pos_embed"],
        pre + "patchifier.proj.weight": target["encoder.patch_embed.proj.weight"],
        pre + "patchifier.proj.bias": target["encoder.patch_embed.proj.bias"],
        pre + "patchifier.norm.weight": target["encoder.patch_embed.norm.weight"],
        dec + "preprocessor.vision_preprocessor.module.weight": target["decoder.image_proj.weight"],
        dec + "preprocessor.vision_preprocessor.module.bias": target["decoder.image_proj.bias"],
        text + "positional_embedding": torch.cat([target["decoder.text_pos_embed"][0], extra_row]),
        text + "cls_token": target["decoder.start_token"],
        text + "text_embedding.weight": target["decoder.text_embed.weight"],
        dec + "head.blocks.0.linear.weight": target["decoder.text_head.weight"],
        dec + "head.blocks.1.linear.weight": target["decoder.pixel_head.weight"],
    }
    assert len(theirs) == len(target) + 2 * 2 * 2  # q, k, v where we hold one qkv: 2 more per block
    mapped = l3m_to_module(theirs, max_text_len=8)
    assert sorted(mapped) == sorted(target)
    for name, value in target.items():
        assert torch.equal(mapped[name], value), name
    fresh = AIMv2(get_size("debug"), 56, vocab_size=30, max_text_len=8)
    fresh.load_state_dict(mapped, strict=True)
    with pytest.raises(ValueError, match="positional_embedding has 9 rows, fewer than max_text_len 10"):
        l3m_to_module(theirs, max_text_len=10)
