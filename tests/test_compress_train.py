"""`aimv2 compress` end to end on real offline image-caption shards (the demo's digit scans):
stage-1 alignment with a frozen tiny random LM lowers the held-out caption loss; evaluate writes
the table and plot per M; export/load_bundle round-trips to identical outputs; plan runs; every
shipped compress config loads; mistakes are one-line errors naming the key or file."""

import json
import math

import lightning as L
import pytest
import torch

from aimv2 import load_encoder
from aimv2.cli import main
from aimv2.compress import load_bundle
from aimv2.compress.config import CompressConfig
from aimv2.compress.evaluate import score
from aimv2.compress.module import held_out_loader, load_module
from aimv2.compress.train import build_module
from aimv2.config import load_config
from aimv2.data.demo import build_demo_shards
from compress_utils import TINY_LM, compress_config, write_encoder_checkpoint
from conftest import REPO

STEPS = 40
STAGE1 = [
    "stage=1",
    "compressor.kind=pool",
    "compressor.num_tokens=4",
    "compressor.train_tokens=[1,4,16]",
    "lm.init_std=0.2",
    "optim.lr=1e-2",
    "optim.warmup_steps=5",
    "data.batch_size=8",
    "text.tokenizer.max_length=12",
    "text.prompt='a picture of'",
    f"trainer.max_steps={STEPS}",
]


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """One stage-1 run through the CLI, and the held-out loss of its untrained start."""
    tmp = tmp_path_factory.mktemp("compress")
    demo = build_demo_shards(tmp / "data", image_size=56)  # 56 px: 4 x 4 patches for the debug encoder
    shards = demo["pretrain"]["dir"]
    train, val = f"{shards}/{{00000..00004}}.tar", f"{shards}/00005.tar"
    encoder = write_encoder_checkpoint(tmp / "encoder.ckpt", img_size=56)
    cfg = compress_config(tmp, encoder, train, *STAGE1, val=val)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # the start `train` draws
    start = build_module(cfg).eval()
    held_out = list(held_out_loader(val, "data.val", start.tokenizer, start.vlm.preprocessing, 32, 0))[:3]
    s = score(start, held_out)
    argv = [
        f"encoder.source={encoder}",
        f"data.train='{train}'",
        f"data.val='{val}'",
        f"run_dir={tmp / 'run'}",
        "data.num_workers=0",
        "data.shuffle_buffer=200",
        "trainer.accelerator=cpu",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
        *TINY_LM,
        *STAGE1,
    ]
    assert main(["compress", "train", str(REPO / "configs/compress/tiny.yaml"), *argv]) == 0
    return {"tmp": tmp, "run": tmp / "run", "val": val, "held_out": held_out, "before": s["sum"] / s["tokens"]}


def test_stage1_alignment_lowers_the_held_out_caption_loss(aligned, capsys):
    run = aligned["run"]
    module = load_module(str(run / "checkpoints" / "last.ckpt"))
    assert module.stage == 1 and not any(p.requires_grad for p in module.vlm.lm.parameters())
    s = score(module, aligned["held_out"])
    after = s["sum"] / s["tokens"]
    print(f"held-out caption loss before {aligned['before']:.3f} -> after {after:.3f} ({STEPS} steps)")
    # measured: 11.40 -> 10.65 nats/token (uniform would be ln 49408 = 10.81; frozen random LM, init_std 0.2)
    assert after < aligned["before"] - 0.3
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("vlm.encoder.") for k in ckpt["state_dict"])  # rebuilt from encoder.source
    assert any(k.startswith("vlm.lm.") for k in ckpt["state_dict"])  # a random LM is kept (no lm.path)
    assert (run / "config.yaml").is_file() and (run / "logs" / "metrics.csv").is_file()


def test_evaluate_writes_table_json_and_plot_per_m(aligned, capsys):
    out = aligned["tmp"] / "eval"
    assert (
        main(
            [
                "compress",
                "evaluate",
                str(aligned["run"]),
                "--tokens",
                "1,4,16",
                "--out",
                str(out),
                "--max-batches",
                "1",
                "--num-workers",
                "0",
                "--shuffled",
            ]
        )
        == 0
    )
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["num_tokens"], r["shuffled"]) for r in rows] == [(m, s) for m in (1, 4, 16) for s in (False, True)]
    for r in rows:
        assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
        assert math.isclose(r["prefill_gflops"], 2 * r["lm_params"] * (r["text_tokens"] + r["num_tokens"]) / 1e9)
        assert r["images"] == 32 and r["skipped"] == 0
    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + 6 and "| pool | 1 | 4 | matched |" in table and "| 4 | shuffled |" in table
    assert (out / "loss_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results.md" in capsys.readouterr().out


def test_export_and_load_bundle_round_trip(aligned, capsys):
    out = aligned["tmp"] / "bundle"
    assert main(["compress", "export", str(aligned["run"]), "--out", str(out)]) == 0
    assert main(["compress", "export", str(aligned["run"]), "--out", str(out)]) == 2  # never replaced silently
    assert main(["compress", "export", str(aligned["run"]), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".bundle")) == []  # no temp dirs left
    assert {p.name for p in out.iterdir()} == {
        "bundle.json",
        "compressor.safetensors",
        "lm",
        "encoder.safetensors",
        "config.json",
    }  # + an `aimv2` encoder export
    module = load_module(str(aligned["run"] / "checkpoints" / "last.ckpt"))
    vlm = load_bundle(out)
    assert vlm.preprocessing.img_size == 56 and vlm.compressor.num_tokens == 4
    images = aligned["held_out"][0]["image"][:4]
    with torch.no_grad():
        assert torch.equal(vlm.visual_tokens(images), module.vlm.visual_tokens(images))
        assert torch.equal(vlm.prefill_logits(images), module.vlm.prefill_logits(images))
    front = load_bundle(out, lm=False)  # the front end alone: encoder + compressor
    encoder, pre = load_encoder(out)  # the bundle is also an encoder export any aimv2 tool reads
    with torch.no_grad():
        assert torch.equal(front.visual_tokens(images), module.vlm.visual_tokens(images))
        assert torch.equal(encoder.forward_features(images), module.vlm.encoder.forward_features(images))
    assert pre == vlm.preprocessing


def test_plan_cli_prints_and_writes_the_table(aligned, capsys):
    out = aligned["tmp"] / "plan"
    assert (
        main(
            [
                "compress",
                "plan",
                str(REPO / "configs/compress/tiny.yaml"),
                *TINY_LM,
                "--text-tokens",
                "8",
                "--tokens",
                "1,4",
                "--repeats",
                "1",
                "--params",
                "7e9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    payload = json.loads((out / "plan.json").read_text())
    assert [r["gflops"] for r in payload["rows"]] == [2 * 7e9 * 9 / 1e9, 2 * 7e9 * 12 / 1e9]
    assert "GFLOPs (cached text)" in capsys.readouterr().out


def test_shipped_configs_load():
    configs = sorted((REPO / "configs" / "compress").glob("*.yaml"))
    assert {p.name for p in configs} >= {"tiny.yaml", "llava_stage1.yaml", "finetune_stage2.yaml"}
    for path in configs:
        assert isinstance(load_config(path, [], schema=CompressConfig), CompressConfig)


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    tiny = str(REPO / "configs/compress/tiny.yaml")
    cases = [
        (["compress", "train", tiny, "encoder.source=''"], "config key 'encoder.source': required"),
        (["compress", "train", tiny, "compressor.kind=qformer"], "config key 'compressor.kind': unknown compressor"),
        (
            ["compress", "train", tiny, "compressor.kind=resampler", "compressor.train_tokens=[1,4]"],
            "config key 'compressor.train_tokens'",
        ),
        (["compress", "train", tiny, f"encoder.source={tmp_path / 'none.ckpt'}"], "checkpoint not found"),
        (["compress", "evaluate", str(tmp_path / "nope")], "checkpoint not found"),
        (["compress", "export", str(tmp_path), "--out", str(tmp_path / "b")], "checkpoint not found"),
        (["compress", "plan", tiny, "lm.path=/no/such/model"], "config key 'lm.path': model directory not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err


def test_stage2_starts_from_the_stage1_compressor_and_trains_the_lm(aligned):
    tmp = aligned["tmp"]
    stage1 = torch.load(aligned["run"] / "checkpoints" / "last.ckpt", weights_only=True)
    cfg = load_config(
        aligned["run"] / "config.yaml",
        [
            "stage=2",
            f"compressor.init={aligned['run']}",
            f"run_dir={tmp / 'stage2'}",
            "trainer.max_steps=2",
            "optim.lm_lr_scale=0.125",
            "optim.warmup_steps=0",
        ],
        schema=CompressConfig,
    )
    from aimv2.compress.train import init_compressor, train

    L.seed_everything(0, verbose=False)
    module = build_module(cfg)
    assert all(p.requires_grad for p in module.vlm.lm.parameters())
    init_compressor(module, str(aligned["run"]))
    for k, v in module.vlm.compressor.state_dict().items():
        assert torch.equal(v, stage1["state_dict"][f"vlm.compressor.{k}"])
    train(cfg)
    stage2 = torch.load(tmp / "stage2" / "checkpoints" / "last.ckpt", weights_only=True)
    lrs = sorted({g["initial_lr"] for g in stage2["optimizer_states"][0]["param_groups"]})
    assert lrs == [1e-2 * 0.125, 1e-2]  # the LLM at lm_lr_scale of the compressor's lr
    key = "vlm.lm.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(stage2["state_dict"][key], stage1["state_dict"][key])  # the LLM trained


def test_checkpoints_that_hold_the_whole_config_still_load(aligned, tmp_path):
    """Before the module received its sections, checkpoints held the whole config tree ({"config": ...});
    such a checkpoint, even moved out of its run directory, loads to the same attachment and still
    names its held-out shards."""
    from dataclasses import asdict

    from aimv2.compress.evaluate import trained_val_shards

    last = aligned["run"] / "checkpoints" / "last.ckpt"
    whole = asdict(load_config(aligned["run"] / "config.yaml", schema=CompressConfig))
    torch.save(torch.load(last, weights_only=True) | {"hyper_parameters": {"config": whole}}, tmp_path / "old.ckpt")
    old, new = load_module(str(tmp_path / "old.ckpt")), load_module(str(last))
    assert (old.stage, old.seed, old.compressor_cfg, old.lm_cfg) == (
        new.stage,
        new.seed,
        new.compressor_cfg,
        new.lm_cfg,
    )
    assert trained_val_shards(str(tmp_path / "old.ckpt")) == trained_val_shards(str(last)) == aligned["val"]
    images = aligned["held_out"][0]["image"][:2]
    with torch.no_grad():
        assert torch.equal(old.vlm.prefill_logits(images), new.vlm.prefill_logits(images))
