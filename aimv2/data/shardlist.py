"""Shard lists: brace expansion, existence checks and per-shard sample counts.

Counts come from the per-shard manifest `NNNNN_stats.json` that `aimv2 shards` (and img2dataset)
write beside each tar, so sizes are known without reading the tars; a shard without one is
counted by listing its members once.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from aimv2.data.samples import IMAGE_EXTS
from aimv2.data.shards import shard_sample_count
from aimv2.errors import UserError

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://")


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int  # samples, -1 when unknown (remote shard without a local manifest)


def expand_urls(spec: str, key: str) -> list[str]:
    """'/d/{000..002}.tar::/e/x.tar' -> the list of shard urls; local shards must exist."""
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part.strip()) if u]
    if not urls:
        raise UserError(f"{key}: no shards in {spec!r}")
    for url in urls:
        if not url.startswith(REMOTE_PREFIXES) and not Path(url).is_file():
            raise UserError(f"{key}: shard not found: {url}")
    return urls


def count_tar_samples(path: str) -> int:
    """Samples in a tar = distinct keys that have an image member."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition("/")[2].partition(".")
            if ext.lower() in IMAGE_EXTS:
                keys.add(stem)
    return len(keys)


def resolve_shards(spec: str, key: str, need_counts: bool) -> list[ShardInfo]:
    infos = []
    for url in expand_urls(spec, key):
        count = shard_sample_count(url) if not url.startswith(REMOTE_PREFIXES) else None
        if count is None and need_counts:
            if url.startswith(REMOTE_PREFIXES):
                raise UserError(f"{key}: epoch mode needs sample counts, but remote shard {url} has no manifest")
            log.warning("no count manifest beside %s: listing the tar to count its samples", url)
            try:
                count = count_tar_samples(url)
            except (tarfile.TarError, OSError) as err:
                raise UserError(f"{key}: cannot read shard {url}: {err}") from None
        infos.append(ShardInfo(url, -1 if count is None else count))
    return infos
