"""`aimv2 probe suite`: the report card of several data sets and encoders, end to end through the CLI on
tiny sets (class folders and class shards) with tiny encoders; resume set by set; bad input marked failed
while the other sets' results stay; the shipped suites validate; and the weighted k-NN against votes
computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from aimv2.cli import main
from aimv2.errors import UserError
from aimv2.probe.heads import cached_rows, knn_accuracy, knn_on_cache, knn_predict, pool
from aimv2.probe.suite import load_suite, named_checkpoints, probe_config_file, set_config, split_overrides
from conftest import REPO
from test_probe_helpers import write_colour_folders, write_tiny_checkpoint

FAST = [
    "progress_bar=false",
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "optim.lrs=[1e-2]",
    "optim.weight_decays=[0.05]",
    "data.batch_size=16",
    "data.num_workers=0",
    "accelerator=cpu",
]


# -- the weighted k-NN, by hand ---------------------------------------------------------------------------------------
def _unit(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


# Four train points on the circle (lengths differ: only the direction may count) and two queries.
TRAIN = torch.tensor([_unit(0, 5.0), _unit(30, 0.5), _unit(-30, 2.0), _unit(90, 3.0)])  # (4, 2)
TRAIN_LABELS = torch.tensor([0, 1, 1, 2])
VAL = torch.tensor([_unit(0, 2.0), _unit(90, 0.1)])  # (2, 2)


def _by_hand(k: int, temperature: float = 0.07) -> torch.Tensor:
    """The votes written out: cosine similarities of each query to the four train points, the k largest
    vote exp(sim / T) for their class."""
    c30 = math.cos(math.radians(30))
    sims = [
        [(1.0, 0), (c30, 1), (c30, 1), (0.0, 2)],  # query at 0 deg
        [(0.0, 0), (0.5, 1), (-0.5, 1), (1.0, 2)],
    ]  # query at 90 deg
    votes = torch.zeros(2, 3, dtype=torch.float64)
    for row, pairs in enumerate(sims):
        for sim, label in sorted(pairs, reverse=True)[:k]:
            votes[row, label] += math.exp(sim / temperature)
    return votes


def test_knn_matches_the_weighted_vote_by_hand():
    votes = knn_predict([(TRAIN, TRAIN_LABELS)], VAL, 3, ks=[1, 2, 3, 20], device="cpu")
    for k in (1, 2, 3, 20):  # 20 > 4 train rows: all of them vote
        assert torch.allclose(votes[k].double(), _by_hand(k), rtol=1e-4), k
    # k = 3 at the first query: one neighbour of class 0 at similarity 1 outweighs two of class 1 at 0.866
    # (exp(1/0.07) = 1.6e6 > 2 exp(0.866/0.07) = 4.7e5): a plain majority would say 1, the weighted vote 0.
    assert votes[3].argmax(1).tolist() == [0, 2]
    assert math.isclose(votes[3][0, 0].item(), math.exp(1 / 0.07), rel_tol=1e-5)
    assert math.isclose(votes[3][0, 1].item(), 2 * math.exp(math.cos(math.radians(30)) / 0.07), rel_tol=1e-5)
    # A warmer temperature flattens the weights and the two class-1 neighbours win: 2 e^0.866 > e^1.
    warm = knn_predict([(TRAIN, TRAIN_LABELS)], VAL, 3, ks=[3], temperature=1.0)[3]
    assert torch.allclose(warm.double(), _by_hand(3, 1.0), rtol=1e-5) and warm[0].argmax().item() == 1
    assert knn_accuracy(votes[3], torch.tensor([0, 1])) == {"top1": 50.0, "top5": 100.0}


def test_knn_streams_the_train_set_in_chunks_on_any_device():
    """Chunks of one row and one val row per block give the votes of one pass over everything: the
    running top-k merges across chunks. Features on the CPU; on a GPU too where there is one."""
    whole = knn_predict([(TRAIN, TRAIN_LABELS)], VAL, 3, ks=[2, 3])
    rows = [(TRAIN[i : i + 1], TRAIN_LABELS[i : i + 1]) for i in range(len(TRAIN))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        chunked = knn_predict(iter(rows), VAL, 3, ks=[2, 3], device=device, val_block=1)
        for k in (2, 3):
            assert chunked[k].device.type == device
            assert torch.allclose(chunked[k].cpu(), whole[k], rtol=1e-5), (device, k)


def test_knn_on_a_token_cache(tmp_path):
    """A probe cache of padded tokens (native resolution): rows are mean-pooled over their real tokens and
    read in chunks bounded by bytes; the k-NN of the cache files equals the one of the pooled tensors."""
    tokens = torch.randn(6, 4, 2)
    lengths = torch.tensor([4, 2, 3, 4, 1, 4])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    tokens[1, 2:] = tokens[2, 3:] = tokens[4, 1:] = 0  # the padding
    save_file({"features": tokens, "labels": labels, "lengths": lengths}, str(tmp_path / "train.safetensors"))
    save_file({"features": tokens[:3], "labels": labels[:3], "lengths": lengths[:3]}, str(tmp_path / "val.safetensors"))
    pooled = pool(tokens, lengths)
    assert torch.allclose(pooled[1], tokens[1, :2].mean(0)) and torch.allclose(pooled[4], tokens[4, 0])
    chunks = list(cached_rows(tmp_path / "train.safetensors", max_bytes=2 * 4 * 2 * 4))  # two rows per read
    assert [len(y) for _, y in chunks] == [2, 2, 2]
    assert torch.allclose(torch.cat([f for f, _ in chunks]), pooled)
    scores = knn_on_cache(tmp_path / "train.safetensors", tmp_path / "val.safetensors", 3, ks=[1])
    assert scores == {"1": {"top1": 100.0, "top5": 100.0}}  # each val row finds itself (similarity 1)


# -- the suite, end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    write_tiny_checkpoint(root / "run/checkpoints/last.ckpt", seed=0)
    write_tiny_checkpoint(root / "run/checkpoints/step=0000000.ckpt", seed=1)
    write_colour_folders(root / "colours/train", 12, seed=0)
    write_colour_folders(root / "colours/val", 6, seed=1)
    two = {"dark": (40, 40, 40), "light": (220, 220, 220)}
    write_colour_folders(root / "tones/train_folders", 12, seed=2, classes=two)
    write_colour_folders(root / "tones/val_folders", 6, seed=3, classes=two)
    for split in ("train", "val"):  # the second set as class shards
        argv = [
            "shards",
            "classes",
            "--root",
            str(root / f"tones/{split}_folders"),
            "--out",
            str(root / f"tones/{split}"),
        ]
        assert main(argv) == 0
    return root


def _suite(path: Path, sets: dict, **top) -> Path:
    lines = [f"{key}: {json.dumps(value)}" for key, value in top.items()] + ["sets:"]
    for name, entry in sets.items():
        lines += [f"  {name}:"] + [f"    {key}: {json.dumps(value)}" for key, value in entry.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _ckpts(toy: Path) -> list[str]:
    return [
        "--checkpoint",
        f"pre-trained={toy}/run/checkpoints/last.ckpt",
        "--checkpoint",
        f"{toy}/run/checkpoints/step=0000000.ckpt",
    ]


@pytest.mark.slow  # 13 s on 2 idle cores: 8 probes of tiny sets (the failure test below runs the CLI in the fast lane)
def test_suite_cli_writes_the_report_card_and_resumes(toy, tmp_path, capsys):
    suite = _suite(
        tmp_path / "two.yaml",
        {
            "colours": {"train": str(toy / "colours/train"), "val": str(toy / "colours/val")},
            "tones": {
                "train": str(toy / "tones/train"),
                "val": str(toy / "tones/val"),
                "probe": ["head.kinds=[linear]"],
            },
        },
        root=str(toy),
        knn={"ks": [3, 5]},
    )
    out = tmp_path / "card"
    argv = ["probe", "suite", str(suite), *_ckpts(toy), "--out", str(out), *FAST]
    assert main(argv) == 0
    summary = json.loads((out / "suite.json").read_text())
    assert summary["columns"] == ["linear", "attentive", "kNN k=3", "kNN k=5"]
    assert list(summary["encoders"]) == ["pre-trained", "step 0"]
    rows = {(r["set"], r["encoder"]): r for r in summary["rows"]}
    assert set(rows) == {(s, e) for s in ("colours", "tones") for e in ("pre-trained", "step 0")}
    assert all(r["status"] == "ok" for r in rows.values()) and summary["failed"] == 0
    assert set(rows["colours", "pre-trained"]["heads"]) == {"attentive", "linear"}
    assert set(rows["tones", "step 0"]["heads"]) == {"linear"}  # the set's own override
    assert rows["tones", "step 0"]["train_count"] == 24 and rows["tones", "step 0"]["classes"] == 2
    # noisy solid colours: the nearest neighbours are trivially right
    assert all(r["knn"][k]["top1"] >= 90.0 for r in rows.values() for k in ("3", "5"))
    # means over the sets every encoder has a number for: attentive only on colours
    assert summary["mean_sets"]["attentive"] == ["colours"] and summary["mean_sets"]["linear"] == ["colours", "tones"]
    expected = (rows["colours", "step 0"]["knn"]["5"]["top1"] + rows["tones", "step 0"]["knn"]["5"]["top1"]) / 2
    assert summary["mean"]["step 0"]["kNN k=5"] == pytest.approx(expected, abs=0.01)
    md = (out / "suite.md").read_text()
    assert "| data set | encoder | linear | attentive | kNN k=3 | kNN k=5 |" in md
    assert "| tones | step 0 |" in md and "| **mean** | pre-trained |" in md and "—" in md
    assert "aimv2 probe suite" in md and (out / "suite.png").stat().st_size > 10_000
    assert (out / "pre-trained/colours/features/train.safetensors").is_file()  # features extracted once, cached
    assert "probe:" in (out / "suite.yaml").read_text() and "optim.epochs=2" in (out / "suite.yaml").read_text()
    capsys.readouterr()

    # Rerun: every finished (set, encoder) is kept, not probed again; the table is the same.
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("finished before, kept") == 4 and "probing" not in err
    assert json.loads((out / "suite.json").read_text())["rows"] == summary["rows"]
    # A run killed during the second set: its cards are missing; the rerun probes only those.
    for encoder in ("pre-trained", "step_0"):
        (out / encoder / "tones/card.json").unlink()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (
        err.count("finished before, kept") == 2
        and err.count("tones / ") == 2
        and "colours / pre-trained: probing" not in err
    )
    # Another protocol for the set is not the finished one: probed again.
    assert main([*argv, "sets.colours.probe=['head.kinds=[linear]']"]) == 0
    assert capsys.readouterr().err.count(": probing") == 2


def test_a_failed_set_is_marked_and_the_others_kept(toy, tmp_path, capsys):
    odd = write_colour_folders(tmp_path / "odd", 3, classes={"red": (200, 0, 0), "cyan": (0, 200, 200)})
    (tmp_path / "empty").mkdir()
    suite = _suite(
        tmp_path / "bad.yaml",
        {
            "colours": {"train": str(toy / "colours/train"), "val": str(toy / "colours/val")},
            "extra_class": {"train": str(toy / "colours/train"), "val": str(odd)},  # val has a class train lacks
            "empty": {"train": str(tmp_path / "empty"), "val": str(toy / "colours/val")},
            "too_small": {
                "train": str(toy / "colours/train"),
                "val": str(toy / "colours/val"),
                "probe": ["img_size=30"],
            },
        },
    )
    out = tmp_path / "card"
    argv = [
        "probe",
        "suite",
        str(suite),
        "--checkpoint",
        f"{toy}/run/checkpoints/last.ckpt",
        "--out",
        str(out),
        *FAST,
        "head.kinds=[linear]",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("aimv2 probe: error: 3 of 4 probes failed (first: extra_class / last:") and "suite.md" in err
    rows = {r["set"]: r for r in json.loads((out / "suite.json").read_text())["rows"]}
    assert rows["colours"]["status"] == "ok" and rows["colours"]["knn"]["20"]["top1"] >= 90.0
    reasons = {name: rows[name]["error"] for name in ("extra_class", "empty", "too_small")}
    assert all(rows[name]["status"] == "failed" and "\n" not in why for name, why in reasons.items())
    assert "class sets differ" in reasons["extra_class"] and "cyan" in reasons["extra_class"]
    assert "no class directories" in reasons["empty"] and "empty" in reasons["empty"]
    assert "img_size=30 does not fit the encoder" in reasons["too_small"]
    md = (out / "suite.md").read_text()
    assert "| extra_class | last | failed | failed | failed |" in md and "class sets differ" in md
    assert "| **mean (1 set)** | last |" in md  # over the sets that finished


def test_suite_mistakes_are_one_line_errors_before_anything_runs(toy, tmp_path, capsys):
    good = {"train": str(toy / "colours/train"), "val": str(toy / "colours/val")}

    def err(suite: Path, *extra) -> str:
        assert main(["probe", "suite", str(suite), "--out", str(tmp_path / "out"), *extra]) == 2
        msg = capsys.readouterr().err.strip()
        assert len(msg.splitlines()) == 1, msg
        return msg

    ckpt = ["--checkpoint", f"{toy}/run/checkpoints/last.ckpt"]
    typo = _suite(tmp_path / "typo.yaml", {"colours": good | {"probe": ["optim.epoch=3"]}})
    assert "data set 'colours': " in err(typo, *ckpt) and "optim.epoch" in err(typo, *ckpt)
    augmented = _suite(tmp_path / "aug.yaml", {"colours": good | {"probe": ["mode=augmented"]}})
    assert "data set 'colours': mode=augmented" in err(augmented, *ckpt)
    plain = _suite(tmp_path / "plain.yaml", {"colours": good})
    assert "no encoder to probe" in err(plain)
    assert "encoder 'gone': checkpoint not found" in err(plain, "--checkpoint", f"gone={tmp_path}/x.ckpt")
    assert "suite file not found" in err(tmp_path / "nope.yaml", *ckpt)
    assert "--train/--val are for a single probe" in err(plain, *ckpt, "--train", str(toy))
    assert not (tmp_path / "out").exists()  # nothing ran
    assert main(["probe", *ckpt, *ckpt, "--train", str(toy), "--val", str(toy)]) == 2
    assert "aimv2 probe suite" in capsys.readouterr().err


def test_checkpoint_names_and_override_routing(tmp_path):
    run = "runs/demo/pretrain/checkpoints"
    assert named_checkpoints([f"{run}/last.ckpt", f"{run}/step=0000000.ckpt"]) == {
        "last": f"{run}/last.ckpt",
        "step 0": f"{run}/step=0000000.ckpt",
    }
    assert named_checkpoints([f"random init={run}/step=0000000.ckpt"]) == {"random init": f"{run}/step=0000000.ckpt"}
    assert list(named_checkpoints(["a/checkpoints/last.ckpt", "b/checkpoints/last.ckpt"])) == ["a/last", "b/last"]
    with pytest.raises(UserError, match="given twice"):
        named_checkpoints(["x=a.ckpt", "x=b.ckpt"])
    assert split_overrides(["root=/d", "knn.ks=[5]", "sets.a.val=/v", "optim.epochs=3", "head.kinds=[linear]"]) == (
        ["root=/d", "knn.ks=[5]", "sets.a.val=/v"],
        ["optim.epochs=3", "head.kinds=[linear]"],
    )


@pytest.mark.parametrize("name", ["suite_offline.yaml", "suite_paper.yaml"])
def test_shipped_suites_validate_every_set(name, tmp_path):
    """Every set of a shipped suite makes a valid cached probe config (its overrides exist and check)."""
    path = REPO / "configs/probe" / name
    suite = load_suite(path)
    base = probe_config_file(suite, path)
    assert base is not None and base.parent == path.parent
    checkpoints = suite.checkpoints or {"encoder": "runs/x/checkpoints/last.ckpt"}
    for set_name in suite.sets:
        for encoder, ckpt in checkpoints.items():
            cfg = set_config(suite, base, set_name, ckpt, tmp_path / encoder / set_name)
            assert cfg.mode == "cached" and cfg.data.train != cfg.data.val and cfg.checkpoint == ckpt
    if name == "suite_offline.yaml":  # the demo's encoders side by side, on the digits and the five scene tasks
        assert list(suite.checkpoints) == ["pre-trained", "random init"]
        assert suite.checkpoints["random init"].endswith("step=0000000.ckpt")
        assert list(suite.sets) == ["digits", "shape", "colour", "position", "size", "count"]
    else:  # ImageNet and the paper's other frozen-trunk sets, placeholders under root
        assert list(suite.sets)[0] == "imagenet" and len(suite.sets) == 15
        assert all(entry.train.startswith("/data/") for entry in suite.sets.values())
