"""Training a grid of heads on one frozen forward pass: per-head AdamW, schedule and clipping.

Every (kind, lr, wd) triple is one probe. Probes of a kind are stacked (see heads.py), so the
optimizer works on stacked tensors too: each parameter has a leading head axis, and the learning
rate, weight decay and gradient-norm clip are vectors over that axis. The loss is the sum of the
probes' cross-entropies; as no parameter is shared, each probe receives exactly its own gradient.

Head-training state on disk (heads.pt): weights, AdamW moments and the epochs done, tagged with a
fingerprint of the settings so that a probe resumes only what was trained the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from aimv2.checkpoints import schema
from aimv2.engine.optim import warmup_cosine
from aimv2.fileio import atomic_file
from aimv2.probe.config import ProbeOptimConfig
from aimv2.probe.heads import build_heads


@dataclass(frozen=True)
class HeadSpec:
    kind: str
    lr: float
    wd: float

    @property
    def name(self) -> str:
        return f"{self.kind}_lr{self.lr:g}_wd{self.wd:g}"


def grid_specs(kinds: list[str], lrs: list[float], wds: list[float]) -> list[HeadSpec]:
    return [HeadSpec(kind, lr, wd) for kind in kinds for lr in lrs for wd in wds]


class HeadGrid(nn.Module):
    """All probes: one stacked module per kind. forward(features) -> {kind: logits (B, H_kind, C)}."""

    def __init__(
        self, specs: list[HeadSpec], dim: int, num_classes: int, cfg: ProbeOptimConfig, attention_heads: int = 1
    ):
        super().__init__()
        self.specs, self.cfg, self.num_classes = specs, cfg, num_classes
        self.kinds = list(dict.fromkeys(s.kind for s in specs))
        self.heads = nn.ModuleDict(
            {k: build_heads(k, sum(s.kind == k for s in specs), dim, num_classes, attention_heads) for k in self.kinds}
        )
        for k in self.kinds:
            mine = [s for s in specs if s.kind == k]
            self.register_buffer(f"lr_{k}", torch.tensor([s.lr for s in mine]))
            self.register_buffer(f"wd_{k}", torch.tensor([s.wd for s in mine]))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """lengths: real tokens per zero-padded row (native resolution), or None."""
        return {k: self.heads[k](features, lengths) for k in self.kinds}

    def loss(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sum over probes of the mean cross-entropy: each probe's gradient is its own."""
        total = 0.0
        for out in logits.values():  # (B, H, C)
            B, H, C = out.shape
            total = total + F.cross_entropy(out.reshape(B * H, C), labels.repeat_interleave(H), reduction="sum") / B
        return total

    def train_step(
        self,
        features: torch.Tensor | None,
        labels: torch.Tensor | None,
        total_steps: int,
        warmup_steps: int,
        reduce_grads=None,
        lengths: torch.Tensor | None = None,
    ) -> float:
        """One step of every probe; returns the mean probe loss. `reduce_grads(params)` averages the
        gradients across processes (multi-device augmented mode) before the update."""
        if features is None:  # nothing usable in this process's batch: join the averaging with zeros
            loss = torch.zeros(())
            for p in self.parameters():
                p.grad = torch.zeros_like(p)
        else:
            loss = self.loss(self(features.float(), lengths), labels)
            loss.backward()
        if reduce_grads is not None:
            reduce_grads([p for p in self.parameters() if p.grad is not None])
        self.optimizer_step(total_steps, warmup_steps)
        return float(loss.detach()) / len(self.specs)

    # -- optimizer -------------------------------------------------------------------------
    def lr_scale(self, total_steps: int, warmup_steps: int) -> float:
        """The schedule's factor at the current step (1 at the peak), shared by every probe."""
        return warmup_cosine(int(self.step), warmup_steps, total_steps, 1.0, 0.0)

    @torch.no_grad()
    def optimizer_step(self, total_steps: int, warmup_steps: int) -> None:
        """AdamW on stacked parameters: lr, wd and the clip act per probe (the leading axis)."""
        cfg, t = self.cfg, int(self.step) + 1
        b1, b2 = cfg.betas
        scale = self.lr_scale(total_steps, warmup_steps)
        for k in self.kinds:
            params = [p for p in self.heads[k].parameters() if p.grad is not None]
            peak = getattr(self, f"lr_{k}")
            floor = torch.clamp(peak, max=cfg.min_lr)  # cosine to min_lr, never above a probe's own lr
            lr = floor + (peak - floor) * scale  # (H,)
            if warmup_steps and int(self.step) < warmup_steps:
                lr = peak * scale
            wd = getattr(self, f"wd_{k}")
            if cfg.grad_clip > 0:
                sq = sum(p.grad.pow(2).reshape(p.shape[0], -1).sum(1) for p in params)  # (H,)
                clip = (cfg.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            else:
                clip = torch.ones_like(peak)
            for name, p in self.heads[k].named_parameters():
                if p.grad is None:
                    continue
                shape = (-1,) + (1,) * (p.dim() - 1)
                g = p.grad * clip.view(shape)
                key = f"{k}.{name}"
                if key not in self._moments:
                    self._moments[key] = (torch.zeros_like(p), torch.zeros_like(p))
                m, v = self._moments[key]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if p.dim() >= 3:  # matrices decay; queries and biases do not
                    p.mul_(1 - (lr * wd).view(shape))
                denom = (v / (1 - b2**t)).sqrt_().add_(1e-8)
                p.sub_(lr.view(shape) * (m / (1 - b1**t)) / denom)
                p.grad = None
        self.step += 1

    def optimizer_state(self) -> dict:
        """The AdamW moments by parameter (`kind.name`): {"m", "v"}, live tensors (save or copy them)."""
        return {key: {"m": m, "v": v} for key, (m, v) in self._moments.items()}

    def load_optimizer_state(self, state: dict) -> None:
        """Moments saved by `optimizer_state` (heads.pt is read onto the CPU), each put on its parameter's
        device and dtype, as the ones `optimizer_step` makes with zeros_like: the update mixes them with
        the gradient in place (`m.mul_(b1).add_(g)`), which fails across devices on a GPU grid. Copies,
        so the grid never shares a moment with the state it was given. A moment for a parameter the grid
        lacks, or of another shape, is a ValueError."""
        params = {f"{k}.{name}": p for k in self.kinds for name, p in self.heads[k].named_parameters()}
        moments = {}
        for key, saved in state.items():
            p = params.get(key)
            if p is None:
                raise ValueError(f"optimizer state for {key!r}: the head grid has no such parameter")
            m, v = saved["m"], saved["v"]
            if m.shape != p.shape or v.shape != p.shape:
                raise ValueError(
                    f"optimizer state for {key!r}: moments of shape {tuple(m.shape)}, parameter {tuple(p.shape)}"
                )
            moments[key] = (
                m.to(device=p.device, dtype=p.dtype, copy=True),
                v.to(device=p.device, dtype=p.dtype, copy=True),
            )
        self._moments = moments

    # -- evaluation ------------------------------------------------------------------------
    def new_metrics(self) -> dict[str, list[tuple[MulticlassAccuracy, MulticlassAccuracy]]]:
        # No sync on compute: multi-process evaluation sums the states itself (aimv2.probe.augmented),
        # and under torchrun only rank 0 evaluates cached features -- an implicit gather would hang.
        top5 = min(5, self.num_classes)
        acc = lambda k: MulticlassAccuracy(self.num_classes, top_k=k, average="micro", sync_on_compute=False)  # noqa: E731
        return {k: [(acc(1), acc(top5)) for _ in range(self.heads[k].H)] for k in self.kinds}

    @staticmethod
    def update_metrics(metrics: dict, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        labels = labels.cpu()
        for k, out in logits.items():
            out = out.float().cpu()
            for h, (top1, top5) in enumerate(metrics[k]):
                top1.update(out[:, h], labels)
                top5.update(out[:, h], labels)

    def results(self, metrics: dict) -> list[dict]:
        rows, index = [], {k: 0 for k in self.kinds}
        for spec in self.specs:
            top1, top5 = metrics[spec.kind][index[spec.kind]]
            index[spec.kind] += 1
            rows.append(
                {
                    "head": spec.kind,
                    "lr": spec.lr,
                    "wd": spec.wd,
                    "top1": 100.0 * float(top1.compute()),
                    "top5": 100.0 * float(top5.compute()),
                }
            )
        return rows


def load_head_state(grid: HeadGrid, path: Path, fingerprint: str) -> int:
    """Epochs already done (0 when no matching state): heads, optimizer moments and step restored, each
    on the device (and dtype) of the grid's own tensors, wherever the file was written."""
    if not path.is_file():
        return 0
    try:  # read onto the CPU (written on any device); the grid places every tensor beside its parameter
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged state file: start over
        return 0
    if not schema.head_state_matches(state, fingerprint):
        print(
            f"probe: {path} was made with other settings or by another aimv2 version; training the heads from scratch",
            file=sys.stderr,
        )
        return 0
    grid.load_state_dict(state["grid"])
    grid.load_optimizer_state(state["optim"])
    print(f"probe: resuming head training after epoch {state['epoch']} from {path}", file=sys.stderr)
    return int(state["epoch"])


def save_head_state(grid: HeadGrid, path: Path, fingerprint: str, epoch: int) -> None:
    """Atomic: a crash mid-write leaves the previous epoch's state."""
    with atomic_file(path) as tmp:
        torch.save(schema.head_state(fingerprint, epoch, grid.state_dict(), grid.optimizer_state()), tmp)
