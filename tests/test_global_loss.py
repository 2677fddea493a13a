"""One gradient for the global batch: on 2 real DDP processes (Lightning's DDP, gloo on CPU, through the
module's own training_step) whose batches hold different numbers of samples (3 and 1) with different
caption and prefix lengths, every parameter's gradient on each rank and the logged losses equal those of
one process given all 4 samples in one batch; fixed-size and native packed batches. The per-rank mean
loss this replaced gives another gradient in the same setup."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from aimv2.config import ModelConfig, ObjectiveConfig, OptimConfig
from aimv2.data.native import PackedCollator, place_rows
from aimv2.engine.trainer import ddp_buffer_sync
from aimv2.pretraining.module import AIMv2PretrainModule

P, SIZE, TEXT_LEN, VOCAB, ROW_TOKENS = 14, 56, 8, 40, 24
SPLIT = [[0, 1, 2], [3]]  # the samples of rank 0 and rank 1
PREFIX = [1, 7, 12, 3]  # fixed-size, 16 patches: 15 + 9 + 4 image targets on rank 0, 13 on rank 1
LENGTHS = [2, 8, 5, 1]  # caption tokens: 15 on rank 0, 1 on rank 1
GRIDS = [(4, 4), (3, 5), (2, 3), (5, 2)]  # native images: 16, 15, 6 and 10 patches
PACKED_PREFIX = [2, 11, 1, 4]
LOGGED = ("train/loss", "train/loss_img", "train/loss_text")


class GivenPrefix(AIMv2PretrainModule):
    """Takes the batch's own prefix lengths, so that the split batches and the whole batch use the same."""

    def _loss_sums(self, batch, generator, prefix=None):
        return super()._loss_sums(batch, generator, batch["prefix"])

    def _packed_loss_sums(self, batch, generator, prefix=None):
        return super()._packed_loss_sums(batch, generator, batch["prefix"])


def make_batches(indices: list[int]) -> list[dict]:
    """[a fixed-size batch, a native packed batch] of the samples `indices` (the same 4 samples every call)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, SIZE, SIZE, generator=g)
    tokens = torch.randint(3, VOCAB, (4, TEXT_LEN), generator=g)
    mask = torch.arange(TEXT_LEN)[None, :] < torch.tensor(LENGTHS)[:, None]  # (4, L)
    tokens = tokens.masked_fill(~mask, 0)
    native = [torch.randn(3, gh * P, gw * P, generator=g) for gh, gw in GRIDS]
    counters = {"skipped": torch.tensor(0), "shard_errors": torch.tensor(0)}
    idx = torch.tensor(indices)
    fixed = {
        "image": images[idx],
        "tokens": tokens[idx],
        "token_mask": mask[idx],
        "prefix": torch.tensor(PREFIX)[idx],
        **counters,
    }
    collate = PackedCollator(lambda captions: (tokens[captions], mask[captions]), P, ROW_TOKENS)
    rows = place_rows([GRIDS[i][0] * GRIDS[i][1] for i in indices], ROW_TOKENS)
    packed = collate([(native[i], i) for i in indices], rows)
    packed.update(prefix=torch.tensor(PACKED_PREFIX)[idx], **counters)
    return [fixed, packed]


class RankBatches(Dataset):
    """Step k gives this rank's k-th batch (rank 0 without a process group)."""

    def __init__(self, per_rank: list[list[dict]]):
        self.per_rank = per_rank

    def __len__(self) -> int:
        return len(self.per_rank[0])

    def __getitem__(self, step: int) -> dict:
        dist = torch.distributed
        return self.per_rank[dist.get_rank() if dist.is_initialized() else 0][step]


def as_is(batch: dict) -> dict:
    return batch


class Record(L.Callback):
    """Each step's gradients (after DDP's all-reduce, before clipping) and logged losses, saved per rank."""

    def __init__(self, out: Path):
        self.out, self.steps = out, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(
            {"grads": {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[-1]["logged"] = {k: float(trainer.callback_metrics[k]) for k in LOGGED}

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.steps, self.out / f"rank{trainer.global_rank}.pt")


def fit(module: AIMv2PretrainModule, per_rank: list[list[dict]], out: Path) -> list[list[dict]]:
    """One optimizer step per batch (lr 0: the weights never move) on len(per_rank) processes; each rank's record."""
    out.mkdir()
    devices = len(per_rank)
    # The project's DDP settings (aimv2.engine.trainer.build_strategy), started by spawning: the default launcher
    # would re-run pytest's command line.
    strategy = (
        DDPStrategy(start_method="spawn", **ddp_buffer_sync(), gradient_as_bucket_view=True) if devices > 1 else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=len(per_rank[0]),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=out,
        callbacks=[Record(out)],
    )
    trainer.fit(module, DataLoader(RankBatches(per_rank), batch_size=None, collate_fn=as_is))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def per_rank_mean_gradients(module: AIMv2PretrainModule, step: int) -> dict[str, torch.Tensor]:
    """What DDP made of the old loss: the average over ranks of the gradients of each rank's own batch mean."""
    total: dict[str, torch.Tensor] = {}
    for indices in SPLIT:
        batch = make_batches(indices)[step]
        module.zero_grad()
        losses_of = module._packed_losses if "patches" in batch else module._losses
        losses_of(batch, None, prefix=batch["prefix"])[0].total.backward()
        for name, param in module.named_parameters():
            if param.grad is not None:
                total[name] = total.get(name, 0) + param.grad / len(SPLIT)
    return total


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over all parameters, relative to the largest |b| of that parameter (at least 1e-3)."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-3)) for n in b)


@pytest.mark.slow
def test_two_ranks_of_unequal_batches_give_the_single_process_gradient(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks share the 2 cores
    torch.manual_seed(0)
    module = GivenPrefix(
        ModelConfig(size="debug", img_size=SIZE, native=True, attention="sdpa"),
        ObjectiveConfig(),
        OptimConfig(lr=0.0, min_lr=0.0, weight_decay=0.0, warmup_steps=0),
        VOCAB,
        TEXT_LEN,
    )
    # The native model takes fixed-size batches too: one process start serves both kinds of batch.
    single = fit(copy.deepcopy(module), [make_batches([0, 1, 2, 3])], tmp_path / "single")[0]
    ranks = fit(copy.deepcopy(module), [make_batches(indices) for indices in SPLIT], tmp_path / "ddp")
    for step, kind in enumerate(("fixed-size", "packed")):
        expected = single[step]
        for rank, record in enumerate(ranks):
            got = record[step]
            assert max_difference(got["grads"], expected["grads"]) < 1e-5, (kind, rank)
            for key in LOGGED:  # the global batch's means, on every rank
                assert abs(got["logged"][key] - expected["logged"][key]) < 1e-5 * abs(expected["logged"][key]), key
        old = per_rank_mean_gradients(copy.deepcopy(module), step)
        assert max_difference(old, expected["grads"]) > 1e-3, kind  # the per-rank mean is another gradient
