"""Augmented mode, the paper's protocol: features recomputed every step from freshly augmented images.

On several devices (`devices=N` spawns N local processes; under torchrun the ranks already exist)
every process streams its own share of the training set (the same number of batches per rank)
and of the validation set. The heads start from the same draw and their gradients are averaged
across processes before every AdamW step, so they stay identical -- checked at the end on a
checksum of the weights. The non-affine BatchNorm normalizes with each process's own batch (as DDP
without SyncBatchNorm does); its running statistics are averaged before evaluation. Metric states,
sample and skip counts are summed across processes; rank 0 writes the head state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from aimv2.data.samples import eval_transform
from aimv2.fileio import atomic_write
from aimv2.probe.config import ProbeConfig
from aimv2.probe.data import Split, augment_transform, eval_batches, train_batches
from aimv2.probe.features import all_reduce_sum, comm_device, encode, pick_device, spawn
from aimv2.probe.head_grid import HeadGrid, load_head_state, save_head_state
from aimv2.progress import progress as progress_bar


@dataclass
class AugmentedJob:
    """Everything one process needs (picklable: sent to spawned ranks)."""

    grid: HeadGrid
    encoder: torch.nn.Module
    train: Split
    val: Split
    cfg: ProbeConfig
    size: int
    mean: tuple
    std: tuple
    state_path: Path
    fingerprint: str


def run_augmented(job: AugmentedJob) -> dict | None:
    """{"rows", "train_count", "val_count", "skipped"}; None on torchrun ranks other than 0."""
    if dist.is_available() and dist.is_initialized():
        return _run(job, dist.get_rank(), dist.get_world_size())
    if job.cfg.devices <= 1:
        return _run(job, 0, 1)
    out = job.state_path.with_name(".augmented_result.json")
    out.unlink(missing_ok=True)
    spawn(_spawned_rank, job.cfg.devices, job.cfg.accelerator, job, out)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _spawned_rank(rank: int, world: int, job: AugmentedJob, out: Path) -> None:
    result = _run(job, rank, world)
    if rank == 0:
        atomic_write(out, json.dumps(result))


def _run(job: AugmentedJob, rank: int, world: int) -> dict | None:
    cfg, grid = job.cfg, job.grid
    device = pick_device(cfg.accelerator, rank)
    comm = comm_device(cfg.accelerator, rank) if world > 1 else device
    encoder = job.encoder.to(device)
    reduce_grads = None
    if world > 1:

        def reduce_grads(params):
            for p in params:
                all_reduce_sum(p.grad, comm).div_(world)

    train_skipped = _train(job, encoder, device, rank, world, reduce_grads)
    if world > 1:
        _average_batchnorm(grid, world, comm)
        _check_identical(grid, comm)
    metrics, val_count, val_skipped = _evaluate(job, encoder, device, rank, world)
    counts = torch.tensor([train_skipped, val_count, val_skipped], dtype=torch.long)
    if world > 1:
        for per_head in metrics.values():
            for pair in per_head:
                for metric in pair:
                    for name in metric._defaults:  # MulticlassAccuracy's states are sums (tp, fp, tn, fn)
                        all_reduce_sum(getattr(metric, name), comm)
        all_reduce_sum(counts, comm)
    rows = grid.results(metrics)
    if rank != 0:
        return None
    return {
        "rows": rows,
        "train_count": job.train.count,
        "val_count": int(counts[1]),
        "skipped": {"train_last_epoch": int(counts[0]), "val": int(counts[2])},
    }


def _train(job: AugmentedJob, encoder, device, rank: int, world: int, reduce_grads) -> int:
    """Trains the heads; returns the corrupt samples skipped in the last epoch, on this rank."""
    cfg, grid = job.cfg, job.grid
    grid.to(device).train()
    start = load_head_state(grid, job.state_path, job.fingerprint)
    loader = train_loader(job, rank, world, start)
    per_epoch = len(loader)
    total, warmup = per_epoch * cfg.optim.epochs, per_epoch * cfg.optim.warmup_epochs
    bar = progress_bar(
        total=total,
        initial=start * per_epoch,
        desc="heads (augmented)",
        unit="step",
        enable=cfg.progress_bar and rank == 0,
        leave=False,
    )
    skipped = 0
    for epoch in range(start, cfg.optim.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)  # augmentation draws, per epoch and rank
        skipped = 0
        for batch in loader:
            skipped += int(batch["skipped"])
            if len(batch["label"]) > 1:  # BatchNorm cannot train on one sample (corrupt ones were dropped)
                feats = encode(encoder, batch["image"].to(device), list(cfg.head.blocks))  # (B, N, D)
                loss = grid.train_step(feats, batch["label"].to(device), total, warmup, reduce_grads)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
            elif world > 1:  # the other ranks wait for this one's gradients: send zeros
                grid.train_step(None, None, total, warmup, reduce_grads)
            bar.update(1)
        if rank == 0:
            save_head_state(grid, job.state_path, job.fingerprint, epoch + 1)
    bar.close()
    return skipped


def train_loader(job: AugmentedJob, rank: int, world: int, start_epoch: int):
    """This rank's augmented training batches, starting at `start_epoch` (the epochs heads.pt says are
    done): the shuffle is seeded by the epoch, so a resumed run sees the order an uninterrupted run
    would have seen in that epoch."""
    cfg = job.cfg
    loader = train_batches(
        job.train,
        augment_transform(job.size, job.mean, job.std),
        cfg.data.batch_size,
        cfg.data.num_workers,
        rank=rank,
        world=world,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    loader.set_epoch(start_epoch)
    return loader


def _average_batchnorm(grid: HeadGrid, world: int, comm) -> None:
    for module in grid.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            all_reduce_sum(module.running_mean, comm).div_(world)
            all_reduce_sum(module.running_var, comm).div_(world)


def _check_identical(grid: HeadGrid, comm) -> None:
    """Averaged gradients keep the heads identical on every rank; a divergence is a bug, not noise."""
    mine = torch.stack([p.detach().double().sum() for p in grid.parameters()]).cpu()
    total = all_reduce_sum(mine.clone(), comm)
    if not torch.allclose(total, mine * dist.get_world_size(), rtol=1e-9, atol=1e-9):
        raise RuntimeError("probe heads diverged across processes")


@torch.no_grad()
def _evaluate(job: AugmentedJob, encoder, device, rank: int, world: int) -> tuple[dict, int, int]:
    cfg, grid = job.cfg, job.grid
    grid.to(device).eval()
    metrics, count, skipped = grid.new_metrics(), 0, 0
    transform = eval_transform(job.size, job.mean, job.std)
    for batch in eval_batches(job.val, transform, cfg.data.batch_size, cfg.data.num_workers, rank, world):
        skipped += int(batch["skipped"])
        if batch["keys"]:
            feats = encode(encoder, batch["image"].to(device), list(cfg.head.blocks))
            grid.update_metrics(metrics, grid(feats), batch["label"])
            count += len(batch["keys"])
    return metrics, count, skipped
