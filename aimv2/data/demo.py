"""The offline demo set: real handwritten digits, shipped inside scikit-learn's wheel.

Why digits: these machines cannot download anything, yet the demo must train on real images
whose captions are predictable from the pixels (so the caption loss can fall) and must give a
probe a real held-out accuracy. `sklearn.datasets.load_digits()` holds 1797 real 8x8 scans of
10 classes with no network access. Each scan is upscaled and lightly varied (ink colour, paper
tint, position) so the JPEGs differ and captions can name what is visible.

Layout under `out_dir`:
  pretrain/      image-caption shards (every digit not held out)
  probe/train/   class-labelled shards of the same digits as pretrain, plus classes.json
  probe/val/     class-labelled shards of the held-out digits (never in pretrain), classes.json
  heldout/       image-caption shards of the same held-out digits: a pre-training validation set (data.val)
  demo.json      parameters and result; written last, so its presence marks a complete set
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from aimv2.data.shards import ShardSample, classes_json, write_shards
from aimv2.fileio import atomic_write

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_INKS = {
    "black": (20, 20, 20),
    "dark blue": (25, 40, 150),
    "dark red": (150, 20, 25),
    "dark green": (20, 110, 40),
    "purple": (105, 30, 135),
}
_PAPERS = {
    "white": (250, 250, 250),
    "cream": (248, 238, 210),
    "light grey": (212, 212, 212),
    "light blue": (210, 228, 250),
}
_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written in {ink} ink on a {paper} background",
    "a scanned image of a handwritten {digit}",
    "a {ink} handwritten {word} on {paper} paper",
    "a blurry picture of the digit {word} in {ink}",
)
_VAL_FRACTION = 0.2
_SPLITS = {"pretrain": "pretrain", "probe_train": "probe/train", "probe_val": "probe/val", "heldout": "heldout"}


def _render(pixels: np.ndarray, rng: np.random.Generator, image_size: int) -> tuple[bytes, str, str]:
    """One 8x8 scan (values 0..16) -> coloured, shifted JPEG; returns (bytes, ink, paper)."""
    gray = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
    inner = max(8, int(round(image_size * 0.8)))
    digit = gray.resize((inner, inner), Image.BICUBIC)
    canvas = Image.new("L", (image_size, image_size), 0)
    dx, dy = rng.integers(0, image_size - inner + 1, size=2)
    canvas.paste(digit, (int(dx), int(dy)))
    ink_name = list(_INKS)[rng.integers(len(_INKS))]
    paper_name = list(_PAPERS)[rng.integers(len(_PAPERS))]
    ink = np.array(_INKS[ink_name], np.float32)
    paper = np.array(_PAPERS[paper_name], np.float32) + rng.integers(-6, 7, size=3)
    alpha = np.asarray(canvas, np.float32)[..., None] / 255.0  # (H, W, 1)
    rgb = np.clip(paper * (1.0 - alpha) + ink * alpha, 0, 255).astype(np.uint8)  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue(), ink_name, paper_name


def _split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ~80/20 split of indices: (train, held-out val), both sorted."""
    train, val = [], []
    for cls in range(len(DIGIT_NAMES)):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(idx) * _VAL_FRACTION))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _existing(out: Path, params: dict) -> dict | None:
    """The recorded result when a complete set with the same parameters is already there."""
    try:
        recorded = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if recorded.get("params") != params:
        return None
    if not all((out / sub / "manifest.json").is_file() for sub in _SPLITS.values()):
        return None
    if not (out / "vocab.txt").is_file():  # a set written before the word list was
        return None
    return recorded.get("result")


def build_demo_shards(out_dir: str | Path, samples_per_shard: int = 256, seed: int = 0, image_size: int = 112) -> dict:
    """Write (or find) the demo set; returns {"out_dir", "classes", "vocabulary" (the captions' word
    list, for data.tokenizer.kind=words), and per split
    "pretrain"/"probe_train"/"probe_val"/"heldout": {"dir", "urls", "count", "shards"}}."""
    from sklearn.datasets import load_digits  # deferred: sklearn import costs ~1 s

    from aimv2.data.tokenizer import write_vocabulary

    out = Path(out_dir).resolve()
    params = {"samples_per_shard": samples_per_shard, "seed": seed, "image_size": image_size}
    found = _existing(out, params)
    if found is not None:
        return found

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)  # (1797, 8, 8), (1797,)
    split_rng, render_rng, order_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    train_idx, val_idx = _split(labels, split_rng)

    rendered: list[tuple[bytes, str]] = []
    for pixels, label in zip(images, labels):
        jpeg, ink, paper = _render(pixels, render_rng, image_size)
        template = _TEMPLATES[render_rng.integers(len(_TEMPLATES))]
        caption = template.format(word=DIGIT_NAMES[label], digit=int(label), ink=ink, paper=paper)
        rendered.append((jpeg, caption))

    def sample(i: int, with_caption: bool) -> ShardSample:
        jpeg, caption = rendered[i]
        return ShardSample(
            key=f"{i:09d}",  # the digit's index in load_digits: unique across all splits
            image=jpeg,
            image_ext="jpg",
            caption=caption if with_caption else None,
            cls=None if with_caption else int(labels[i]),
            source=f"sklearn.datasets.load_digits()[{i}]",
        )

    classes = {"classes.json": classes_json(list(DIGIT_NAMES))}
    # Pretraining order is shuffled once so a small stream shuffle buffer still mixes classes.
    plans = {
        "pretrain": ([sample(i, True) for i in order_rng.permutation(train_idx)], {}),
        "probe_train": ([sample(i, False) for i in train_idx], classes),
        "probe_val": ([sample(i, False) for i in val_idx], classes),
        "heldout": ([sample(i, True) for i in val_idx], {}),  # probe_val's digits with their captions
    }
    result: dict = {"out_dir": str(out), "classes": list(DIGIT_NAMES)}
    for name, (samples, extra) in plans.items():
        report = write_shards(
            samples, out / _SPLITS[name], samples_per_shard, progress=False, overwrite=True, extra_files=extra
        )
        result[name] = {
            "dir": str(report.out_dir),
            "urls": report.urls,
            "count": report.total,
            "shards": len(report.shards),
        }
    # The captions' own words (a few dozen): the word tokenizer's vocabulary (data.tokenizer.kind=words).
    write_vocabulary((caption for _, caption in rendered), out / "vocab.txt")
    result["vocabulary"] = str(out / "vocab.txt")
    atomic_write(out / "demo.json", json.dumps({"params": params, "result": result}, indent=1) + "\n")
    return result


def heldout_examples(val_dir: Path, out_dir: Path, classes: list[str], count: int = 4) -> Path:
    """The first `count` held-out digits of distinct classes as image files with a true caption
    (`NNN.jpg` + `NNN.txt`), so `aimv2 visualize --images DIR` can show what the model makes of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(sorted(val_dir.glob("*.tar"))[0]) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if info.isfile() and ext in ("jpg", "cls"):
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    seen: set[int] = set()
    for key, sample in sorted(members.items()):
        cls = int(sample.get("cls", b"-1"))
        if "jpg" in sample and cls not in seen and len(seen) < count:
            seen.add(cls)
            (out_dir / f"{key}.jpg").write_bytes(sample["jpg"])
            (out_dir / f"{key}.txt").write_text(f"a handwritten digit {classes[cls]}\n", encoding="utf-8")
    return out_dir
