"""The generated scene set (aimv2.data.scenes) and `aimv2 shards scenes`: layout, captions that name
shape and colour only, and labels that say what the pixels show (objects counted, located, measured)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from aimv2 import cli
from aimv2.data.scenes import COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, TASKS, build_scene_shards


def _samples(directory: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(directory).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    return out, build_scene_shards(out, pretrain=60, probe_train=40, probe_val=40, image_size=112, samples_per_shard=25)


def test_layout_and_held_out(scenes):
    out, result = scenes
    assert result["pretrain"]["count"] == 60 and result["pretrain"]["shards"] == 3
    assert set(result["tasks"]) == set(TASKS) and result["named"] == ["shape", "colour"]
    pre = _samples(result["pretrain"]["dir"])
    for task, entry in result["tasks"].items():
        assert entry["named"] == (task in ("shape", "colour"))
        assert json.loads((Path(entry["train"]["dir"]) / "classes.json").read_text()) == list(TASKS[task])
        train, val = _samples(entry["train"]["dir"]), _samples(entry["val"]["dir"])
        assert len(train) == 40 and len(val) == 40
        assert not set(pre) & set(val) and not set(train) & set(val)
        assert all(0 <= int(s["cls"]) < len(TASKS[task]) for s in val.values())
    # Every task labels the same held-out images.
    assert len({frozenset(_samples(e["val"]["dir"])) for e in result["tasks"].values()}) == 1


def test_captions_name_shape_and_colour_only(scenes):
    _, result = scenes
    unnamed = {w for names in (POSITIONS, SIZES, COUNTS) for n in names for w in n.split()} | {"1", "2", "3", "4"}
    for sample in _samples(result["pretrain"]["dir"]).values():
        words = set(sample["txt"].decode().replace(",", " ").split())
        assert len(words & set(SHAPES)) == 1 and len(words & set(COLOURS)) == 1
        assert not words & unnamed, words
    # the word list beside the set holds exactly the captions' words (data.tokenizer.kind=words)
    from aimv2.data.tokenizer import split_words

    captions = [s["txt"].decode() for s in _samples(result["pretrain"]["dir"]).values()]
    assert Path(result["vocabulary"]).read_text().split("\n")[:-1] == sorted(
        {w for c in captions for w in split_words(c)}
    )


def test_labels_match_the_pixels(scenes):
    """Objects found in the image (pixels far from the background) agree with every label."""
    _, result = scenes
    labels = {
        task: {k: int(s["cls"]) for k, s in _samples(e["val"]["dir"]).items()} for task, e in result["tasks"].items()
    }
    areas = {0: [], 1: []}
    for key, sample in _samples(result["tasks"]["count"]["val"]["dir"]).items():
        rgb = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)  # (H, W, 3)
        background = np.median(rgb.reshape(-1, 3), axis=0)
        mask = np.abs(rgb - background).max(axis=-1) > 60  # (H, W)
        _, n = ndimage.label(mask)
        assert n == labels["count"][key] + 1, key
        ys, xs = np.nonzero(mask)
        half = rgb.shape[0] / 2
        assert (
            POSITIONS[labels["position"][key]] == f"{'top' if ys.mean() < half else 'bottom'} "
            f"{'left' if xs.mean() < half else 'right'}"
        )
        colour = rgb[mask].mean(axis=0)
        nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - colour).sum())
        assert nearest == list(COLOURS)[labels["colour"][key]], key
        areas[labels["size"][key]].append(mask.sum() / n)
    assert max(areas[0]) < min(areas[1])  # every small object is smaller than every large one


def test_is_idempotent_and_cli(scenes, capsys, tmp_path):
    out, result = scenes
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert (
        build_scene_shards(out, pretrain=60, probe_train=40, probe_val=40, image_size=112, samples_per_shard=25)
        == result
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert (
        cli.main(["shards", "scenes", "--out", str(tmp_path / "s"), "--counts", "8", "4", "4", "--image-size", "56"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "captions name shape and colour" in printed and "position" in printed and "never named" in printed
    assert Image.open(io.BytesIO(next(iter(_samples(tmp_path / "s" / "pretrain").values()))["jpg"])).size == (56, 56)


def test_heldout_captioned_scenes_leave_the_other_splits_as_they_were(scenes, tmp_path):
    """`heldout`: other scenes with captions (a pre-training validation set), drawn after every other
    split, so the set without them is the same set."""
    out, result = scenes
    more = build_scene_shards(
        tmp_path, pretrain=60, probe_train=40, probe_val=40, image_size=112, samples_per_shard=25, heldout=30
    )
    held = _samples(more["heldout"]["dir"])
    assert more["heldout"]["count"] == 30 and all(s["txt"] and "cls" not in s for s in held.values())
    for split in [("pretrain",)] + [("tasks", t, s) for t in TASKS for s in ("train", "val")]:
        mine, theirs = more, result
        for key in split:
            mine, theirs = mine[key], theirs[key]
        assert _samples(mine["dir"]) == _samples(theirs["dir"]), split  # same keys, images, captions, labels
        assert not set(_samples(mine["dir"])) & set(held)
    assert "heldout" not in result and not (out / "heldout").exists()
