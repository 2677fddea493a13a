"""A generated scene set whose captions say only part of what its probe tasks ask, as web alt-text does.

Why: the paper's objective ablation (AIMv2 vs captioning-only vs pixel-only) is a question about what
each loss teaches the encoder. Captions teach what they name; the pixel loss can teach everything
visible. A fair small-scale test therefore needs probe tasks the captions name and tasks they never
name. Each scene holds 1-4 copies of one shape in one colour and one size class, grouped in one
quadrant of a tinted canvas. Captions name the shape and the colour only; the probe tasks ask for
shape, colour (named) and position, size, count (never named). All five attributes are drawn
independently and uniformly, so no unnamed attribute can be read off a named one.

Layout under `out_dir`:
  pretrain/                  image-caption shards
  probe/<task>/train|val/    class-labelled shards (the same held-out scenes for every task, never
                             in pretrain), with classes.json
  heldout/                   (heldout > 0) image-caption shards of other scenes, in no other split:
                             a pre-training validation set (data.val)
  vocab.txt                  the captions' word list (data.tokenizer.kind=words)
  scenes.json                parameters and result; written last, so its presence marks a complete set
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aimv2.data.shards import ShardSample, classes_json, write_shards
from aimv2.data.tokenizer import write_vocabulary
from aimv2.fileio import atomic_write

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (225, 190, 30),
    "purple": (140, 50, 170),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
COUNTS = ("one", "two", "three", "four")
TASKS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "position": POSITIONS,
    "size": SIZES,
    "count": COUNTS,
}
NAMED = ("shape", "colour")  # what captions say; the other tasks are never named
_DIAMETER = {"small": 0.1, "large": 0.19}  # fractions of the canvas side
_GAP = 0.04  # the least space between two objects (a fraction of the side): 2 px at 56 px
_TEMPLATES = (
    "a {colour} {shape}",
    "{colour} {shape} clip art",
    "a simple drawing of a {shape} in {colour}",
    "the shape {shape}, coloured {colour}",
    "{shape} shape, {colour}",
)
_SUPERSAMPLE = 4  # drawn this much larger, then downsampled: smooth edges at any size


@dataclass(frozen=True)
class Scene:
    shape: int
    colour: int
    position: int
    size: int
    count: int  # index into COUNTS: count + 1 objects

    def label(self, task: str) -> int:
        return getattr(self, task)

    def caption(self, rng: np.random.Generator) -> str:
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        return template.format(shape=SHAPES[self.shape], colour=list(COLOURS)[self.colour])


def _centres(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Object centres (unit coordinates) inside the scene's quadrant: each object in its own cell of
    the quadrant's 2 x 2 grid, jittered within it, at least _GAP apart (never touching: countable)."""
    d = _DIAMETER[SIZES[scene.size]]
    qx, qy = scene.position % 2, scene.position // 2
    slack = 0.25 - d - _GAP  # room left in a 0.25-wide cell
    cells = rng.permutation(4)[: scene.count + 1]
    return [
        (
            qx * 0.5 + (c % 2) * 0.25 + _GAP / 2 + d / 2 + rng.random() * slack,
            qy * 0.5 + (c // 2) * 0.25 + _GAP / 2 + d / 2 + rng.random() * slack,
        )
        for c in cells
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.86
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    else:  # cross
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int) -> bytes:
    """The scene as JPEG bytes: a light tinted canvas, the objects in the scene's quadrant."""
    big = image_size * _SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(215, 256, size=3))
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    colour = np.array(list(COLOURS.values())[scene.colour]) + rng.integers(-15, 16, size=3)
    fill = tuple(int(v) for v in np.clip(colour, 0, 255))
    r = _DIAMETER[SIZES[scene.size]] / 2 * big
    for cx, cy in _centres(scene, rng):
        _draw_shape(draw, SHAPES[scene.shape], cx * big, cy * big, r, fill)
    buf = io.BytesIO()
    img.resize((image_size, image_size), Image.LANCZOS).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def random_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """n scenes with every attribute drawn independently and uniformly."""
    draws = {task: rng.integers(len(names), size=n) for task, names in TASKS.items()}
    return [Scene(**{task: int(draws[task][i]) for task in TASKS}) for i in range(n)]


def _existing(out: Path, params: dict) -> dict | None:
    """The recorded result when a complete set with the same parameters is already there."""
    try:
        recorded = json.loads((out / "scenes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if recorded.get("params") != params:
        return None
    dirs = [out / "pretrain"] + [out / "probe" / t / s for t in TASKS for s in ("train", "val")]
    dirs += [out / "heldout"] if params.get("heldout") else []
    complete = all((d / "manifest.json").is_file() for d in dirs) and (out / "vocab.txt").is_file()
    return recorded.get("result") if complete else None


def build_scene_shards(
    out_dir: str | Path,
    pretrain: int = 6000,
    probe_train: int = 1000,
    probe_val: int = 500,
    seed: int = 0,
    image_size: int = 56,
    samples_per_shard: int = 1000,
    progress: bool = False,
    heldout: int = 0,
) -> dict:
    """Write (or find) the scene set; returns {"out_dir", "pretrain": {dir, urls, count, shards},
    "tasks": {task: {"classes", "named", "train": {...}, "val": {...}}}, and with heldout > 0
    "heldout": {dir, urls, count, shards}}. The held-out scenes are drawn after all others, so the
    other splits are the same whatever `heldout` is."""
    out = Path(out_dir).resolve()
    params = {
        "pretrain": pretrain,
        "probe_train": probe_train,
        "probe_val": probe_val,
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
    }
    if heldout:  # only when asked: sets written without it stay valid
        params["heldout"] = heldout
    found = _existing(out, params)
    if found is not None:
        return found
    scene_rng, render_rng, caption_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    scenes = random_scenes(pretrain + probe_train + probe_val, scene_rng)
    scenes += random_scenes(heldout, scene_rng)  # drawn after: the other splits do not depend on `heldout`
    jpegs = [render_scene(s, render_rng, image_size) for s in scenes]

    def written(samples: list[ShardSample], sub: str, extra: dict | None = None) -> dict:
        report = write_shards(
            samples, out / sub, samples_per_shard, progress=progress, overwrite=True, extra_files=extra
        )
        return {"dir": str(report.out_dir), "urls": report.urls, "count": report.total, "shards": len(report.shards)}

    result: dict = {"out_dir": str(out), "named": list(NAMED), "tasks": {}}
    captions = [scenes[i].caption(caption_rng) for i in range(pretrain)]
    result["pretrain"] = written(
        [ShardSample(f"{i:09d}", jpegs[i], "jpg", caption=captions[i], source=f"scene {i}") for i in range(pretrain)],
        "pretrain",
    )
    # The captions' own words: the word tokenizer's vocabulary (data.tokenizer.kind=words), as the demo's.
    write_vocabulary(captions, out / "vocab.txt")
    result["vocabulary"] = str(out / "vocab.txt")
    splits = {
        "train": range(pretrain, pretrain + probe_train),
        "val": range(pretrain + probe_train, pretrain + probe_train + probe_val),
    }
    for task, names in TASKS.items():
        entry = {"classes": list(names), "named": task in NAMED}
        for split, idx in splits.items():
            entry[split] = written(
                [ShardSample(f"{i:09d}", jpegs[i], "jpg", cls=scenes[i].label(task), source=f"scene {i}") for i in idx],
                f"probe/{task}/{split}",
                {"classes.json": classes_json(list(names))},
            )
        result["tasks"][task] = entry
    if heldout:
        first = pretrain + probe_train + probe_val
        result["heldout"] = written(
            [
                ShardSample(f"{i:09d}", jpegs[i], "jpg", caption=scenes[i].caption(caption_rng), source=f"scene {i}")
                for i in range(first, len(scenes))
            ],
            "heldout",
        )
    atomic_write(out / "scenes.json", json.dumps({"params": params, "result": result}, indent=1) + "\n")
    return result
