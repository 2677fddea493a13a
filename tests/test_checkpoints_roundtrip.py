"""Round trip: the debug size pre-trained briefly by this project, exported in every format through
the CLI, loaded back through `load_encoder`, plain timm and plain transformers (in a process that
never imports aimv2): the same features to within 1e-5 (fp32). Also: resolution change, the
feature helper, the decoder, atomic export and the probe's loader."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from aimv2 import load_encoder
from aimv2.checkpoints import detect_format, extract_features, load_decoder
from aimv2.checkpoints import export as export_module
from aimv2.cli import main
from aimv2.errors import UserError
from aimv2.pretraining.module import AIMv2PretrainModule
from aimv2.probe.features import load_probe_encoder
from checkpoint_helpers import plain_load, pretrain_debug

TOL = 1e-5
FORMATS = ("aimv2", "timm", "hf")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(last.ckpt of a 3-step debug pre-training at 56 px, images, reference tokens from Lightning's own loader)."""
    root = tmp_path_factory.mktemp("ckpt_roundtrip")
    ckpt = pretrain_debug(root, img_size=56, steps=3)
    module = AIMv2PretrainModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = module.model.encoder.eval().forward_features(images)  # (3, 16, 64)
    return ckpt, images, reference, module


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    ckpt = trained[0]
    root = tmp_path_factory.mktemp("exports")
    outs = {}
    for fmt in FORMATS:
        outs[fmt] = root / fmt
        extra = ["--with-decoder"] if fmt == "aimv2" else []
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(outs[fmt]), *extra]) == 0
    return outs


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_pretraining_checkpoint_loads_as_encoder(trained):
    ckpt, images, reference, _ = trained
    assert detect_format(ckpt) == "lightning"
    encoder, pre = load_encoder(ckpt)
    assert not encoder.training and pre.img_size == 56 and pre.interpolation == "bicubic"
    assert _max_diff(encoder.forward_features(images).detach(), reference) <= TOL


def test_every_export_loads_back_through_load_encoder(trained, exports, capsys):
    _, images, reference, _ = trained
    for fmt, out in exports.items():
        assert detect_format(out) == fmt
        encoder, pre = load_encoder(out)
        assert pre.img_size == 56 and pre.mean[0] == pytest.approx(0.48145466), fmt
        assert _max_diff(encoder.forward_features(images).detach(), reference) <= TOL, fmt
    assert sorted(p.name for p in exports["hf"].iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert sorted(p.name for p in exports["timm"].iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in exports["aimv2"].iterdir()) == [
        "config.json",
        "decoder.safetensors",
        "encoder.safetensors",
    ]


def test_exports_load_in_plain_timm_and_transformers_without_aimv2(trained, exports, tmp_path):
    _, images, reference, _ = trained
    found = plain_load(images, exports["timm"], exports["hf"], tmp_path)
    for key in ("timm_dir", "timm_name", "hf"):
        assert _max_diff(found[key], reference) <= TOL, key
    assert int(found["crop"]) == 56 and found["mean"][0].item() == pytest.approx(0.48145466)


def test_timm_config_names_the_architecture_and_its_arguments(exports):
    cfg = json.loads((exports["timm"] / "config.json").read_text())
    assert cfg["architecture"] == "aimv2_large_patch14_224"  # the debug size reuses the L architecture
    assert cfg["model_args"] | {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": [56, 56]} == cfg["model_args"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 56, 56]


def test_decoder_travels_with_the_aimv2_export(trained, exports):
    _, _, _, module = trained
    saved = load_file(exports["aimv2"] / "decoder.safetensors")
    expected = {
        k.removeprefix("model.decoder."): v for k, v in module.state_dict().items() if k.startswith("model.decoder.")
    }
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    decoder = load_decoder(exports["aimv2"])
    assert all(torch.equal(decoder.state_dict()[k], expected[k]) for k in expected)


def test_resolution_change_resamples_the_position_embedding(trained, exports, tmp_path):
    ckpt, _, _, module = trained
    encoder, pre = load_encoder(ckpt, img_size=84)  # 56 -> 84 px is 224 -> 336 at patch 14: a 4x4 -> 6x6 grid
    assert pre.img_size == 84 and encoder.pos_embed.shape == (1, 36, 64)
    expected = resample_abs_pos_embed(module.model.encoder.pos_embed.detach(), new_size=(6, 6), num_prefix_tokens=0)
    assert _max_diff(encoder.pos_embed.detach(), expected) <= 1e-6
    images = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    tokens = extract_features(encoder, images).tokens
    assert tokens.shape == (2, 36, 64)
    # timm's own loader resamples the same way when asked for another size.
    cfg = json.loads((exports["timm"] / "config.json").read_text())
    plain = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        **(cfg["model_args"] | {"img_size": 84}),
        pretrained_cfg_overlay=dict(file=str(exports["timm"] / "model.safetensors")),
    ).eval()
    assert _max_diff(plain.forward_features(images).detach(), tokens) <= TOL
    # Exporting at 84 px gives an export whose own resolution is 84.
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf84"), "--img-size", "84"]) == 0
    assert json.loads((tmp_path / "hf84" / "config.json").read_text())["image_size"] == 84
    again, pre84 = load_encoder(tmp_path / "hf84")
    assert pre84.img_size == 84 and _max_diff(extract_features(again, images).tokens, tokens) <= TOL
    with pytest.raises(UserError, match="img_size=90 .*multiple of its patch size 14"):
        load_encoder(ckpt, img_size=90)


def test_feature_helper_tokens_pooled_blocks_batched(trained):
    ckpt, images, reference, _ = trained
    encoder, _ = load_encoder(ckpt)
    encoder.train()
    feats = extract_features(encoder, images, blocks=[0, -1], norm_blocks=True, batch_size=2)
    assert encoder.training, "the caller's mode is restored"
    assert _max_diff(feats.tokens, reference) <= TOL
    assert _max_diff(feats.pooled, reference.mean(1)) <= TOL  # AIMv2 pools by averaging the patch tokens
    assert sorted(feats.blocks) == [0, 1] and feats.blocks[0].shape == (3, 16, 64)
    assert _max_diff(feats.blocks[1], reference) <= TOL  # the last block, normed, is the output
    one_by_one = extract_features(encoder, [images[i : i + 1] for i in range(3)], blocks=[0])
    assert _max_diff(one_by_one.blocks[0], feats.blocks[0]) > 0  # un-normed vs normed differ...
    assert _max_diff(extract_features(encoder, images, blocks=[0]).blocks[0], one_by_one.blocks[0]) <= TOL
    with pytest.raises(ValueError, match="out of range"):
        extract_features(encoder, images, blocks=[2])


def test_interrupted_export_leaves_nothing_under_the_final_name(trained, tmp_path, monkeypatch):
    ckpt = trained[0]
    real = export_module.save_file

    def crash_after_writing(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)  # a complete weights file exists in the temp dir...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(export_module, "save_file", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        export_module.export_checkpoint(ckpt, tmp_path / "out", "hf")
    assert list(tmp_path.iterdir()) == [], "neither the export nor its temporary directory is left behind"


def test_export_cli_errors_are_one_line(trained, exports, capsys):
    ckpt = trained[0]
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(exports["hf"])]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert (
        main(["export", str(ckpt), "--format", "timm", "--out", str(exports["hf"].parent / "x"), "--with-decoder"]) == 2
    )
    err = capsys.readouterr().err
    assert "holds an encoder only" in err and err.count("\n") == 1
    assert (
        main(
            [
                "export",
                str(exports["hf"]),
                "--format",
                "aimv2",
                "--out",
                str(exports["hf"].parent / "y"),
                "--with-decoder",
            ]
        )
        == 2
    )
    assert "holds no decoder" in capsys.readouterr().err


def test_export_cli_prints_how_to_load(trained, tmp_path, capsys):
    assert main(["export", str(trained[0]), "--format", "timm", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert f"timm.create_model('local-dir:{tmp_path / 't'}', pretrained=True)" in out
    assert "pretrained_cfg_overlay=dict(file=" in out and "embed_dim=64" in out


def test_probe_loader_accepts_every_format(exports):
    encoder, size, pre = load_probe_encoder(exports["hf"])
    assert size == 56 and pre.img_size == 56 and not encoder.training
