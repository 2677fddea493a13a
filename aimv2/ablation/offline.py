"""The ablation's offline data: the generated scenes (aimv2.data.scenes) and the demo's digit scans
(aimv2.data.demo), mixed for pre-training; their probe splits become the tasks.

Why both: the digits are real images whose captions name what the probe asks (the digit); the scenes
add attributes that the captions never name (position, size, count) beside ones they do (shape,
colour), which is where the objectives should differ.
"""

from __future__ import annotations

from pathlib import Path

from aimv2.ablation.plan import Task


def offline_data(out: str | Path, scene_counts: tuple[int, int, int] = (6000, 1000, 500),
                 image_size: int = 112) -> tuple[list[str], list[Task]]:
    """Write (or find) both sets under `out`; returns the pre-training override naming both sources
    (one sample in two from each) and the probe tasks: digits, then the scene tasks."""
    from aimv2.data.demo import build_demo_shards
    from aimv2.data.scenes import build_scene_shards

    out = Path(out)
    digits = build_demo_shards(out / "digits", image_size=image_size)
    pretrain, train, val = scene_counts
    scenes = build_scene_shards(out / "scenes", pretrain=pretrain, probe_train=train, probe_val=val,
                                image_size=image_size)
    sources = (f"data.sources=[{{name: scenes, urls: '{scenes['pretrain']['urls']}'}}, "
               f"{{name: digits, urls: '{digits['pretrain']['urls']}'}}]")
    tasks = [Task("digit", digits["probe_train"]["dir"], digits["probe_val"]["dir"], named=True)]
    tasks += [Task(name, entry["train"]["dir"], entry["val"]["dir"], entry["named"])
              for name, entry in scenes["tasks"].items()]
    return [sources], tasks
