"""The probe's frozen encoder and its features: the encoder from any checkpoint format with its
preprocessing, the process group the probe runs in, and features extracted once and cached.

The frozen encoder of a probe, from a checkpoint, with the preprocessing it expects.

Every format `aimv2.load_encoder` reads works here (this project's .ckpt, a DeepSpeed ZeRO
directory, an `aimv2 export` directory, timm and transformers directories, Apple's release), so
`aimv2 probe checkpoint=...` accepts all of them. `Preprocessing` lives in aimv2.checkpoints.

Process groups for the probe: N local processes spawned here, or the ranks torchrun started.

gloo on CPU, nccl on CUDA. Collectives go through `all_reduce_sum`, which moves a tensor to the
device the backend can reduce on (nccl cannot reduce CPU tensors) and back.

Frozen features: the encoder's forward on probe batches, the on-disk cache, and extraction split
across processes (torch.distributed: gloo on CPU, nccl on CUDA).

Cache layout, in the run directory: `features/{train,val}.safetensors` holding `features`
(N_images, tokens, D) -- or (N_images, D) when only linear heads need them (mean-pooled) -- and
`labels` (N_images,); at native resolution the token sets are zero-padded to the longest and
`lengths` (N_images,) says how many are real; with metadata saying how they were made; a cache
whose metadata differs from
the current run is recomputed. Files appear atomically (aimv2.fileio), so an
interrupted extraction leaves no half file. Rows are sorted by sample key, so the cache does not
depend on how many processes wrote it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from aimv2.checkpoints import Preprocessing, load_encoder, resize_encoder
from aimv2.errors import UserError
from aimv2.fileio import atomic_file
from aimv2.probe.data import Split, eval_batches
from aimv2.progress import progress

__all__ = ["Preprocessing", "fit_resolution", "load_probe_encoder"]


def load_probe_encoder(path: str | Path) -> tuple[VisionTransformer, int, Preprocessing]:
    """(encoder in eval mode, the resolution of its weights, its preprocessing) from any checkpoint format."""
    encoder, preprocessing = load_encoder(path)
    return encoder, preprocessing.img_size, preprocessing


def fit_resolution(encoder: VisionTransformer, trained_size: int, wanted: int) -> int:
    """The resolution to feed: the encoder's own (wanted=0), or `wanted` when the encoder can take it
    (a multiple of its patch size; position embeddings are resampled). Else a UserError naming it."""
    if wanted in (0, trained_size):
        return trained_size
    resize_encoder(encoder, wanted, f"the encoder (trained at {trained_size}; img_size=0 uses that)")
    return wanted


def pick_device(accelerator: str, rank: int = 0) -> torch.device:
    if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("accelerator=cuda but no CUDA device is available")
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _entry(rank: int, fn: Callable, world: int, accelerator: str, init: str, args: tuple) -> None:
    backend = "nccl" if pick_device(accelerator, rank).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        if backend == "gloo":  # the CPU's cores are shared by the local processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, accelerator: str, *args) -> None:
    """Run `fn(rank, world, *args)` in `world` new processes joined in one process group."""
    init = f"tcp://127.0.0.1:{find_free_network_port()}"
    mp.spawn(_entry, args=(fn, world, accelerator, init, args), nprocs=world, join=True)


def comm_device(accelerator: str, rank: int) -> torch.device:
    return pick_device(accelerator, rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks, on `tensor`'s own device (in place when it is already there)."""
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """Frozen patch features (B, N, D): the last block after the final norm, or the mean of `blocks`
    (each passed through the final norm, as the last block's output is)."""
    if not blocks:
        return encoder.forward_features(images)
    outs = encoder.forward_intermediates(
        images, indices=list(blocks), norm=True, output_fmt="NLC", intermediates_only=True
    )
    return torch.stack(outs).mean(0)


def check_blocks(encoder: torch.nn.Module, blocks: list[int]) -> None:
    depth = len(encoder.blocks)
    bad = [b for b in blocks if not -depth <= b < depth]
    if bad:
        raise UserError(f"config key 'head.blocks': {bad} out of range for an encoder with {depth} blocks")


@dataclass
class ExtractJob:
    """Everything one extraction process needs (picklable: sent to spawned ranks)."""

    encoder: torch.nn.Module
    split: Split
    transform: object
    blocks: list[int]
    pooled: bool  # store mean-pooled (B, D) instead of tokens (B, N, D)
    dtype: str
    batch_size: int
    num_workers: int
    accelerator: str
    progress: bool = True
    native: bool = False  # images of different sizes (native resolution): tokens padded, lengths kept


def extract_part(job: ExtractJob, rank: int = 0, world: int = 1) -> dict:
    """This rank's share of the split: {"keys", "features", "labels", "skipped"}."""
    device = pick_device(job.accelerator, rank)
    encoder = job.encoder.to(device).eval()
    loader = eval_batches(job.split, job.transform, job.batch_size, job.num_workers, rank, world)
    keys, feats, labels, skipped = [], [], [], 0
    total = math.ceil(job.split.count / world / job.batch_size)
    bar = progress(
        total=total,
        desc=f"features {job.split.key.split('.')[-1]}",
        unit="batch",
        enable=job.progress and rank == 0,
        leave=False,
    )
    for batch in loader:
        skipped += int(batch["skipped"])
        bar.update(1)
        if not batch["keys"]:
            continue
        images = batch["image"]
        if isinstance(images, list):  # native resolution, sizes differ: one forward per image, at its own grid
            outs = [encode(encoder, image[None].to(device), job.blocks) for image in images]  # (1, N_i, D) each
        else:
            outs = [encode(encoder, images.to(device), job.blocks)]  # (B, N, D)
        feats += [
            (out.mean(1) if job.pooled else out).to(DTYPES[job.dtype]).cpu() for out in outs
        ]  # to the host once per forward
        labels.append(batch["label"])
        keys += batch["keys"]
    bar.close()
    if not feats:
        empty = torch.empty(0)
        return {"keys": [], "features": empty, "labels": empty.long(), "skipped": skipped}
    part = {"keys": keys, "labels": torch.cat(labels), "skipped": skipped}
    if job.native and not job.pooled:  # token sets of different lengths: one (N_i, D) per image
        part["features"], part["lengths"] = pad_tokens([image for out in feats for image in out])
    else:
        part["features"] = torch.cat(feats)
    return part


def pad_tokens(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sets of different lengths (N_i, D) -> zero-padded (B, max N, D) and the lengths (B,)."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths


def merge_parts(parts: list[dict]) -> dict:
    """Rank shares -> one set of rows sorted by sample key (independent of the number of ranks)."""
    parts = [p for p in parts if p["keys"]] or parts[:1]
    keys = [k for p in parts for k in p["keys"]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    merged = {
        "keys": [keys[i] for i in order],
        "labels": torch.cat([p["labels"] for p in parts])[index] if keys else parts[0]["labels"],
        "skipped": sum(p["skipped"] for p in parts),
    }
    if keys and "lengths" in parts[0]:  # padded tokens, each part to its own longest: re-pad them together
        rows = [f[:n] for p in parts for f, n in zip(p["features"], p["lengths"].tolist())]
        merged["features"], merged["lengths"] = pad_tokens([rows[i] for i in order])
    else:
        merged["features"] = torch.cat([p["features"] for p in parts])[index] if keys else parts[0]["features"]
    return merged


# -- multi-process extraction -------------------------------------------------------------------
def _extract_rank(rank: int, world: int, job: ExtractJob, parts_dir: Path) -> None:
    """One rank's share, saved under parts_dir; returns once every share is on disk."""
    import torch.distributed as dist

    part = extract_part(job, rank, world)
    with atomic_file(parts_dir / f"part{rank}.pt") as tmp:
        torch.save(part, tmp)
    dist.barrier()


def extract_distributed(job: ExtractJob, world: int, parts_dir: Path) -> dict | None:
    """Extract on `world` processes (each its share of the split), then gather their shares from disk.
    Under an existing process group (torchrun) this rank does its share and rank 0 gathers."""
    import torch.distributed as dist

    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("part*.pt"):
        old.unlink()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        _extract_rank(rank, world, job, parts_dir)
        if rank != 0:
            return None  # rank 0 gathers, caches and trains the heads
    else:
        spawn(_extract_rank, world, job.accelerator, job, parts_dir)
    parts = [torch.load(parts_dir / f"part{r}.pt", weights_only=True) for r in range(world)]
    for r in range(world):
        (parts_dir / f"part{r}.pt").unlink(missing_ok=True)
    return merge_parts(parts)


# -- cache --------------------------------------------------------------------------------------
def load_cache(path: Path, meta: dict[str, str]) -> dict | None:
    """The cached features when the file exists and was made the same way; else None."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
        if {k: found.get(k) for k in meta} != meta:
            return None
        tensors = load_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable cache is recomputed, not fatal
        return None
    return {
        "features": tensors["features"],
        "labels": tensors["labels"],
        "skipped": int(found.get("skipped", 0)),
        **({"lengths": tensors["lengths"]} if "lengths" in tensors else {}),
    }


def save_cache(path: Path, data: dict, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tensors = {k: data[k].contiguous() for k in ("features", "labels", "lengths") if k in data}
        save_file(
            tensors, str(tmp), metadata={**meta, "skipped": str(data["skipped"]), "count": str(len(data["labels"]))}
        )


def cached_features(job: ExtractJob, path: Path, meta: dict[str, str], devices: int) -> tuple[dict | None, bool]:
    """(features, reused?) for one split: from the cache when it matches, else extracted and cached.
    Under torchrun, ranks other than 0 get None after doing their share."""
    found = load_cache(path, meta)
    if found is not None:
        return found, True
    if devices > 1:
        data = extract_distributed(job, devices, path.parent / f".{path.stem}_parts")
        if data is None:
            return None, False
    else:
        data = merge_parts([extract_part(job)])
    if len(data["labels"]) == 0:
        raise UserError(f"{job.split.key}: no usable images ({data['skipped']} skipped as corrupt)")
    save_cache(path, data, meta)
    return data, False
