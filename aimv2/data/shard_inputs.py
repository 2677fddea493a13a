"""Input readers for the shard writer: a folder of images plus a captions file (JSONL/CSV/TSV), or an
ImageFolder-style class tree. They yield `ShardSample`s; an input that cannot be read becomes a sample
with `error` set, which `write_shards` reports as skipped, so one bad file never stops a write."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from aimv2.data.samples import IMAGE_EXTS
from aimv2.data.shards import ShardSample, image_ext
from aimv2.errors import UserError, one_line

_IMAGE_FIELDS = ("image", "path", "file")
_CAPTION_FIELDS = ("caption", "text")


def load_image_sample(path: Path, key: str, caption: str | None = None, cls: int | None = None) -> ShardSample:
    """Read one image file into a sample; a missing/unreadable/unsupported file becomes a
    sample with `error` set, which `write_shards` reports as skipped."""
    source = str(path)
    ext = image_ext(path)
    if ext is None:
        suffix = path.suffix or "(none)"
        return ShardSample(key, b"", suffix.lstrip("."), caption, cls, source, f"unsupported image extension {suffix}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ShardSample(key, b"", ext, caption, cls, source, "file not found")
    except OSError as err:
        return ShardSample(key, b"", ext, caption, cls, source, f"unreadable file ({one_line(err)})")
    return ShardSample(key, data, ext, caption, cls, source)


class CaptionFileSamples:
    """Samples named by a captions file (JSONL or CSV/TSV with a header) under an images dir.

    The whole file is parsed once up front (nothing kept) so a malformed line fails before a
    shard is written; iteration parses it again and reads images lazily. Keys are the entry's
    running index, zero-padded like img2dataset's (`000000123`): stable, unique, tar-safe.
    """

    def __init__(self, images_dir: str | Path, captions_file: str | Path) -> None:
        self.images_dir = Path(images_dir)
        self.captions_file = Path(captions_file)
        if not self.images_dir.is_dir():
            raise UserError(f"images directory not found: {self.images_dir}")
        if not self.captions_file.is_file():
            raise UserError(f"captions file not found: {self.captions_file}")
        suffix = self.captions_file.suffix.lower()
        if suffix not in (".jsonl", ".csv", ".tsv"):
            raise UserError(
                f"{self.captions_file}: unknown captions file type {suffix or '(none)'} (expected .jsonl, .csv or .tsv)"
            )
        self._suffix = suffix
        self._count = sum(1 for _ in self._entries())

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[ShardSample]:
        for index, (image, caption) in enumerate(self._entries()):
            yield load_image_sample(self.images_dir / image, f"{index:09d}", caption=caption)

    def _entries(self) -> Iterator[tuple[str, str]]:
        try:
            with open(self.captions_file, encoding="utf-8-sig", newline="") as f:
                yield from self._jsonl(f) if self._suffix == ".jsonl" else self._table(f)
        except UnicodeDecodeError as err:
            raise UserError(f"{self.captions_file}: not UTF-8 text ({err.reason} at byte {err.start})") from err

    def _bad(self, line: int, what: str) -> UserError:
        return UserError(f"{self.captions_file}:{line}: {what}")

    def _jsonl(self, f: io.TextIOBase) -> Iterator[tuple[str, str]]:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise self._bad(line_no, f"not valid JSON ({one_line(err)})") from err
            if not isinstance(obj, dict):
                raise self._bad(line_no, "expected a JSON object with 'image' and 'caption'")
            yield self._entry(line_no, obj)

    def _table(self, f: io.TextIOBase) -> Iterator[tuple[str, str]]:
        reader = csv.DictReader(f, delimiter="\t" if self._suffix == ".tsv" else ",")
        header = reader.fieldnames
        if not header:
            raise self._bad(1, "empty file, expected a header row with 'image' and 'caption' columns")
        for wanted in (_IMAGE_FIELDS, _CAPTION_FIELDS):
            if not any(name in header for name in wanted):
                raise self._bad(1, f"header has no {'/'.join(wanted)} column (found: {', '.join(header)})")
        for row in reader:
            if None in row or any(value is None for value in row.values()):
                raise self._bad(reader.line_num, f"expected {len(header)} fields as in the header")
            yield self._entry(reader.line_num, row)

    def _entry(self, line: int, record: dict) -> tuple[str, str]:
        image = next((record[k] for k in _IMAGE_FIELDS if k in record), None)
        if not isinstance(image, str) or not image.strip():
            raise self._bad(line, f"no image path (field {'/'.join(_IMAGE_FIELDS)})")
        if not any(k in record for k in _CAPTION_FIELDS):
            raise self._bad(line, f"no caption (field {'/'.join(_CAPTION_FIELDS)})")
        caption = next(record[k] for k in _CAPTION_FIELDS if k in record)
        if caption is not None and not isinstance(caption, str):
            raise self._bad(line, f"caption must be a string, got {type(caption).__name__}")
        return image.strip(), (caption or "").strip()


def caption_file_samples(images_dir: str | Path, captions_file: str | Path) -> CaptionFileSamples:
    """Image-caption samples from a captions file; see `CaptionFileSamples`."""
    return CaptionFileSamples(images_dir, captions_file)


class ClassTreeSamples:
    """Samples from an ImageFolder-style tree `root/<class_name>/<images>` (nested dirs ok).

    Classes are the sorted directory names (index = position, as torchvision's ImageFolder),
    available as `.classes` before iterating so callers can write `classes.json`. Hidden
    files and directories are ignored; other non-image files are reported as skipped.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"class tree root not found: {self.root}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise UserError(f"{self.root}: no class directories (expected {self.root}/<class_name>/<images>)")
        self._files: list[tuple[str, int]] = []
        for index, name in enumerate(self.classes):
            class_dir = self.root / name
            files = sorted(
                str(p)
                for p in class_dir.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            )
            if not any(image_ext(p) for p in files):
                raise UserError(f"class directory has no images ({', '.join(IMAGE_EXTS)}): {class_dir}")
            self._files += [(p, index) for p in files]

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[ShardSample]:
        for index, (path, cls) in enumerate(self._files):
            yield load_image_sample(Path(path), f"{index:09d}", cls=cls)


def class_tree_samples(root: str | Path) -> ClassTreeSamples:
    """Class-labelled samples from an image folder tree; see `ClassTreeSamples`."""
    return ClassTreeSamples(root)
