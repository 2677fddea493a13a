"""`aimv2 probe` end to end on tiny class folders: results JSON + table, resume, corrupt images
skipped and counted, and the one-line errors (missing split, empty class directory, mismatched
classes, an encoder that does not fit the resolution). Also: cached and augmented modes agree."""

import json

import pytest

from aimv2.cli import main
from aimv2.config import load_config
from aimv2.errors import UserError
from aimv2.probe.config import ProbeConfig, ProbeOptimConfig
from aimv2.probe.run import run_probe
from conftest import REPO
from test_probe_helpers import small_config, write_colour_folders, write_tiny_checkpoint


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_tiny_checkpoint(root / "ckpt" / "model.ckpt")
    write_colour_folders(root / "train", 16, seed=0, corrupt=2)
    write_colour_folders(root / "val", 8, seed=1)
    return root


def test_cli_probe_writes_results_and_resumes(toy, tmp_path, capsys):
    argv = [
        "probe",
        "--checkpoint",
        str(toy / "ckpt/model.ckpt"),
        "--train",
        str(toy / "train"),
        "--val",
        str(toy / "val"),
        "--out",
        str(tmp_path / "run"),
        "optim.epochs=3",
        "optim.warmup_epochs=1",
        "optim.lrs=[1e-3,1e-2]",
        "data.batch_size=16",
        "data.num_workers=0",
        "progress_bar=false",
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert len(results["heads"]) == 2 * 2 * 2  # 2 kinds x 2 lr x 2 wd
    assert sum(r["best"] for r in results["heads"]) == 1
    assert results["skipped"] == {"train": 2, "val": 0}  # the two planted corrupt files
    assert results["train_count"] == 48 and results["val_count"] == 24
    assert results["attention_heads"] == 2  # the debug encoder's own heads (width // 64 would give 1)
    assert "| head | lr | wd | top-1 | top-5 | best |" in out.out and "**best**" in out.out
    assert (tmp_path / "run/results.md").read_text().count("\n|") >= 9
    # Second run: cached features reused, head training resumed (already finished) from heads.pt.
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "reused from cache" in err and "resuming head training after epoch 3" in err
    again = json.loads((tmp_path / "run/results.json").read_text())
    assert [r["top1"] for r in again["heads"]] == [r["top1"] for r in results["heads"]]


def test_cached_and_augmented_modes_agree_on_a_toy_set(toy, tmp_path):
    # Noisy solid colours: trivially separable, and the paper's augmentation (crops, flips, jitter 0.3,
    # RandAugment m9) keeps them separable; both modes should be near perfect, so they agree within 15 points.
    optim = ProbeOptimConfig(lrs=[3e-3, 1e-2], weight_decays=[0.05], epochs=6, warmup_epochs=1)
    cached = run_probe(
        small_config(tmp_path / "c", toy / "train", toy / "val", optim=optim, checkpoint=str(toy / "ckpt/model.ckpt"))
    )
    augmented = run_probe(
        small_config(
            tmp_path / "a",
            toy / "train",
            toy / "val",
            optim=optim,
            mode="augmented",
            checkpoint=str(toy / "ckpt/model.ckpt"),
        )
    )
    assert cached["best"]["top1"] >= 90.0
    assert abs(cached["best"]["top1"] - augmented["best"]["top1"]) <= 15.0
    assert augmented["skipped"]["val"] == 0 and augmented["val_count"] == 24


def test_errors_are_one_line_and_name_the_culprit(toy, tmp_path, capsys):
    ckpt = str(toy / "ckpt/model.ckpt")

    def err(*extra):
        flags = [e for e in extra if "=" not in e or e.startswith("/")]
        argv = [
            "probe",
            "--checkpoint",
            ckpt,
            "--out",
            str(tmp_path / "run"),
            *flags,
            "progress_bar=false",
            *[e for e in extra if e not in flags],
        ]
        assert main(argv) == 2
        msg = capsys.readouterr().err.strip()
        assert len(msg.splitlines()) == 1, msg
        return msg

    assert "split not found" in err("--train", str(tmp_path / "nope"), "--val", str(toy / "val")) and "nope" in err(
        "--train", str(tmp_path / "nope"), "--val", str(toy / "val")
    )
    empty = write_colour_folders(tmp_path / "empty", 2)
    (empty / "yellow").mkdir()
    msg = err("--train", str(empty), "--val", str(toy / "val"))
    assert "empty class directory" in msg and "yellow" in msg
    other = write_colour_folders(tmp_path / "other", 2, classes={"red": (200, 0, 0), "cyan": (0, 200, 200)})
    msg = err("--train", str(toy / "train"), "--val", str(other))
    assert "class sets differ" in msg and "cyan" in msg
    msg = err("--train", str(toy / "train"), "--val", str(toy / "val"), "img_size=30")
    assert "img_size=30 does not fit the encoder" in msg
    assert "checkpoint not found" in err(
        "--train", str(toy / "train"), "--val", str(toy / "val"), f"checkpoint={tmp_path}/x.ckpt"
    )
    assert "optim.warmup_epochs" in err(
        "--train", str(toy / "train"), "--val", str(toy / "val"), "optim.warmup_epochs=100"
    )


def test_shipped_probe_configs_load_and_validate():
    for path in sorted((REPO / "configs/probe").glob("*.yaml")):
        if path.name.startswith("suite_"):
            continue  # `aimv2 probe suite` files: tests/test_probe_suite.py validates them
        cfg = load_config(path, ["checkpoint=x.ckpt", "data.train=a", "data.val=b"], schema=ProbeConfig)
        assert cfg.optim.lrs and cfg.optim.weight_decays
    paper = load_config(
        REPO / "configs/probe/imagenet_attentive.yaml",
        ["checkpoint=x", "data.train=a", "data.val=b"],
        schema=ProbeConfig,
    )
    assert paper.mode == "augmented" and len(paper.optim.lrs) * len(paper.optim.weight_decays) == 14
    assert paper.optim.epochs == 100 and paper.optim.warmup_epochs == 5 and paper.optim.grad_clip == 3.0
    with pytest.raises(UserError, match="mode"):
        load_config(None, ["checkpoint=x", "data.train=a", "data.val=b", "mode=fast"], schema=ProbeConfig)
