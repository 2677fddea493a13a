"""The ablation's offline data: the generated scenes (aimv2.data.scenes) and the demo's digit scans
(aimv2.data.demo), mixed for pre-training; their probe splits become the tasks.

Why both: the digits are real images whose captions name what the probe asks (the digit); the scenes
add attributes that the captions never name (position, size, count) beside ones they do (shape,
colour), which is where the objectives should differ. The captions of both use 58 words, so the
set comes with its word list (`data.tokenizer.kind=words`): CLIP's 49408-way output layer would be
most of every step's cost at this size.

Held out for the pre-training validation loss (data.val): the demo's held-out digits (the probe's val
digits) with their captions, and as many other generated scenes as the probe's val split holds (500 by
default), captioned as the training scenes are; neither is in the pre-training shards.
"""

from __future__ import annotations

from pathlib import Path

from aimv2.ablation.plan import Task


def offline_data(out: str | Path, scene_counts: tuple[int, int, int] = (6000, 1000, 500),
                 image_size: int = 112) -> tuple[list[str], list[Task]]:
    """Write (or find) both sets and their word list under `out`; returns the pre-training overrides
    (both sources, one sample in two from each; the word tokenizer; the held-out validation shards of
    both sets, data.val.urls) and the probe tasks: digits, then the scene tasks."""
    from aimv2.data.demo import build_demo_shards
    from aimv2.data.scenes import build_scene_shards
    from aimv2.data.tokenizer import write_vocabulary

    out = Path(out)
    digits = build_demo_shards(out / "digits", image_size=image_size)
    pretrain, train, val = scene_counts
    scenes = build_scene_shards(out / "scenes", pretrain=pretrain, probe_train=train, probe_val=val,
                                image_size=image_size, heldout=val)
    urls = {"scenes": scenes["pretrain"]["urls"], "digits": digits["pretrain"]["urls"]}
    vocabulary = out / "vocab.txt"
    write_vocabulary((c for u in urls.values() for c in shard_captions(u)), vocabulary)
    overrides = ["data.sources=[" + ", ".join(f"{{name: {n}, urls: '{u}'}}" for n, u in urls.items()) + "]",
                 "data.tokenizer.kind=words", f"data.tokenizer.path='{vocabulary.resolve()}'",
                 f"data.val.urls='{scenes['heldout']['urls']}::{digits['heldout']['urls']}'"]
    tasks = [Task("digit", digits["probe_train"]["dir"], digits["probe_val"]["dir"], named=True)]
    tasks += [Task(name, entry["train"]["dir"], entry["val"]["dir"], entry["named"])
              for name, entry in scenes["tasks"].items()]
    return overrides, tasks


def shard_captions(urls: str):
    """Every caption (`.txt` member) in the shards of a brace pattern, in order."""
    import tarfile

    from braceexpand import braceexpand

    for url in braceexpand(urls):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8")
