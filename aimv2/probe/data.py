"""Probe data: ImageNet-style class folders (split/<class>/<images>) or class-labelled WebDataset
shards written by `aimv2 shards classes` (<key>.jpg + <key>.cls, classes.json beside the tars).

Two readers per split: `eval_batches` (every sample exactly once, split across ranks and workers,
unaugmented: feature extraction and validation; shards through the evaluation reader,
aimv2.data.every_sample, whole shards per slot) and `train_batches` (augmented training: shards go
through the project's `ShardStream` in epoch mode, so every rank runs the same number of steps).
Corrupt images are skipped and counted: each batch carries how many it skipped.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from aimv2.data.every_sample import every_sample_loader, plan_whole_shards
from aimv2.data.native import native_grid
from aimv2.data.samples import IMAGE_EXTS, CorruptSample, decode_image
from aimv2.data.shardlist import ShardInfo, resolve_shards
from aimv2.data.stream import EpochAwareLoader, ShardStream, StreamSource
from aimv2.data.workers import worker_context
from aimv2.errors import UserError

log = logging.getLogger(__name__)
BICUBIC = T.InterpolationMode.BICUBIC


@dataclass
class Split:
    """One split (train or val): its classes and where its samples are."""

    key: str  # the config key, for messages
    kind: str  # "folders" | "shards"
    classes: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)  # folders: (path, label)
    shards: list[ShardInfo] = field(default_factory=list)
    label_map: dict[int, int] | None = None  # shards whose classes.json orders classes differently

    @property
    def count(self) -> int:
        return len(self.files) if self.kind == "folders" else sum(s.count for s in self.shards)


def open_split(path: str, key: str) -> Split:
    """A class-folder root, a directory of class shards, or a shard pattern; a UserError naming it otherwise."""
    p = Path(path)
    if ".tar" in path and not p.is_dir():
        shards = resolve_shards(path, key, need_counts=True)
        return Split(key, "shards", _read_classes(Path(shards[0].url).parent, key), shards=shards)
    if not p.exists():
        raise UserError(f"{key}: split not found: {path}")
    if not p.is_dir():
        raise UserError(f"{key}: not a directory or a .tar shard pattern: {path}")
    tars = sorted(p.glob("*.tar"))
    if tars:
        shards = resolve_shards("::".join(str(t) for t in tars), key, need_counts=True)
        return Split(key, "shards", _read_classes(p, key), shards=shards)
    classes = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{key}: no class directories and no .tar shards in {path} (expected {path}/<class>/<images>)")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = sorted(
            str(f)
            for f in (p / name).rglob("*")
            if f.is_file()
            and f.suffix.lower().lstrip(".") in IMAGE_EXTS
            and not any(part.startswith(".") for part in f.relative_to(p / name).parts)
        )
        if not found:
            raise UserError(f"{key}: empty class directory (no {'/'.join(IMAGE_EXTS)} images): {p / name}")
        files += [(f, label) for f in found]
    return Split(key, "folders", classes, files=files)


def _read_classes(shard_dir: Path, key: str) -> list[str]:
    path = shard_dir / "classes.json"
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{key}: no classes.json beside the shards in {shard_dir} (write them with `aimv2 shards classes`)"
        ) from None
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: unreadable {path}: {err}") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{key}: {path} must be a non-empty JSON list of class names")
    return classes


def match_classes(train: Split, val: Split) -> None:
    """Same class set in both splits (else a UserError naming the difference); val labels follow train's order."""
    if set(train.classes) != set(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))[:3]
        only_val = sorted(set(val.classes) - set(train.classes))[:3]
        raise UserError(
            f"class sets differ between {train.key} ({len(train.classes)} classes) and {val.key} "
            f"({len(val.classes)}): only in train {only_train}, only in val {only_val}"
        )
    if train.classes != val.classes:
        order = {name: i for i, name in enumerate(train.classes)}
        val.label_map = {i: order[name] for i, name in enumerate(val.classes)}
        val.files = [(f, val.label_map[y]) for f, y in val.files]
        val.classes = list(train.classes)
        if val.kind == "folders":
            val.label_map = None


# -- transforms ---------------------------------------------------------------------------------
def augment_transform(img_size: int, mean, std) -> T.Compose:
    """The paper's probe augmentation: RandomResizedCrop (0.08, 1), flip, ColorJitter 0.3, RandAugment m9."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=BICUBIC),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3),
            T.RandAugment(num_ops=2, magnitude=9, interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


# -- samples ------------------------------------------------------------------------------------
class _ShardProcessor:
    """A raw shard sample -> (key, image tensor, label); CorruptSample when unusable."""

    def __init__(self, transform: Callable, num_classes: int, label_map: dict[int, int] | None):
        self.transform, self.num_classes, self.label_map = transform, num_classes, label_map

    def __call__(self, sample: dict) -> tuple[str, torch.Tensor, int]:
        try:
            raw = sample.get("cls")
            label = int(raw.decode("ascii")) if raw is not None else int(json.loads(sample["json"])["cls"])
        except (KeyError, ValueError, TypeError, AttributeError):
            raise CorruptSample(f"no class label in sample {sample.get('__key__')!r}") from None
        if self.label_map is not None:
            label = self.label_map.get(label, -1)
        if not 0 <= label < self.num_classes:
            raise CorruptSample(f"class label {label} out of range in sample {sample.get('__key__')!r}")
        return sample["__key__"], self.transform(decode_image(sample)), label


def _load_file(path: str, transform: Callable) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder failure: skip and count
        raise CorruptSample(f"undecodable image {path}: {err}") from None
    return transform(image)


class NativeEvalTransform:
    """PIL image -> normalized float tensor at its own aspect ratio: resized (bicubic) to the patch grid
    `aimv2.data.native.native_grid` gives it within [min_patches, max_patches]; no crop."""

    def __init__(self, patch: int, min_patches: int, max_patches: int, mean, std):
        self.patch, self.min_patches, self.max_patches = patch, min_patches, max_patches
        self.tail = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        gh, gw = native_grid(image.width, image.height, self.patch, self.min_patches, self.max_patches)
        return self.tail(image.resize((gw * self.patch, gh * self.patch), Image.BICUBIC))


def collate(items: list) -> dict:
    """Items are (key, image, label) or None (corrupt); None are dropped and counted. Images of
    different sizes (native resolution) stay a list."""
    good = [it for it in items if it is not None]
    batch = {"keys": [k for k, _, _ in good], "skipped": len(items) - len(good)}
    images = [im for _, im, _ in good]
    same = len({tuple(im.shape) for im in images}) <= 1
    batch["image"] = (torch.stack(images) if same else images) if good else torch.empty(0)
    batch["label"] = torch.tensor([y for _, _, y in good], dtype=torch.long)
    return batch


class _FolderDataset(Dataset):
    def __init__(self, files: list[tuple[str, int]], indices: list[int], transform: Callable):
        self.files, self.indices, self.transform = files, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        path, label = self.files[index]
        try:
            return f"{index:09d}", _load_file(path, self.transform), label
        except CorruptSample as err:
            log.warning("skipping %s", err)
            return None


def eval_batches(
    split: Split, transform: Callable, batch_size: int, num_workers: int, rank: int = 0, world: int = 1
) -> DataLoader:
    """Batches {keys, image, label, skipped} covering this rank's share of the split, each sample once."""
    if split.kind == "folders":
        indices = list(range(rank, len(split.files), world))
        dataset = _FolderDataset(split.files, indices, transform)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            multiprocessing_context=worker_context(num_workers, dataset),
        )
    process = _ShardProcessor(transform, len(split.classes), split.label_map)
    return every_sample_loader(plan_whole_shards(split.shards, world, num_workers), process, collate, batch_size, rank)


class _FolderEpochs(DataLoader):
    """Class folders for augmented training: a fresh seeded shuffle each epoch, equal share per rank."""

    def __init__(self, split: Split, transform, batch_size, num_workers, rank, world, seed):
        self.split, self.transform, self.rank, self.world, self.seed = split, transform, rank, world, seed
        self._epoch = 0
        per_rank = len(split.files) // world
        dataset = _FolderDataset(split.files, list(range(per_rank)), transform)
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            drop_last=True,
            multiprocessing_context=worker_context(num_workers, dataset),
        )

    def __iter__(self):
        order = list(range(len(self.split.files)))
        random.Random(f"{self.seed}-{self._epoch}").shuffle(order)
        self.dataset.indices = order[self.rank :: self.world][: len(self.dataset)]
        self._epoch += 1
        return super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        """The next iteration shuffles as epoch `epoch` (the same method as the shard loader's)."""
        self._epoch = int(epoch)


def train_batches(
    split: Split,
    transform: Callable,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 1000,
):
    """Augmented training batches; the same number per rank, re-shuffled every epoch (seeded by the
    epoch). Either loader has `set_epoch(k)`: the next iteration is epoch k."""
    if split.kind == "folders":
        if len(split.files) // world < batch_size:
            raise UserError(f"{split.key}: {len(split.files)} images leave a rank without one batch of {batch_size}")
        return _FolderEpochs(split, transform, batch_size, num_workers, rank, world, seed)
    process = _ShardProcessor(transform, len(split.classes), split.label_map)
    try:
        stream = ShardStream(
            [StreamSource("train", split.shards)],
            process=process,
            collate=collate,
            batch_size=batch_size,
            mode="epoch",
            rank=rank,
            world_size=world,
            num_workers=num_workers,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
        )
    except ValueError as err:
        raise UserError(f"{split.key}: {err}") from None
    return EpochAwareLoader(stream, num_workers=num_workers)
