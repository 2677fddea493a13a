"""The optimizer recipe against updates computed by hand: fully decoupled weight decay as Apple's
ml-l3m `AdamLH` applies it (src/l3m/optim/adamw_lh.py: p *= 1 - lambda * lr_t / lr_init, then the
Adam step), over warmup then cosine; the no-decay split; the compressor's groups; the DeepSpeed
CPU-Adam groups; lr = 0."""

from __future__ import annotations

import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aimv2.engine.optim import build_optimizer, decoupled_weight_decay, no_decay_names, warmup_cosine_schedule

LAM, LR, MIN_LR, WARMUP, TOTAL = 1e-4, 1e-3, 1e-5, 3, 8
BETAS, EPS = (0.9, 0.95), 1e-8


def hand_lrs() -> list[float]:
    """The schedule written out: lr/3, 2lr/3, lr, then cosine from lr to MIN_LR over the 5 steps left."""
    warm = [LR * (t + 1) / WARMUP for t in range(WARMUP)]
    cos = [
        MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * (t - WARMUP) / (TOTAL - WARMUP)))
        for t in range(WARMUP, TOTAL)
    ]
    return warm + cos


def adamlh(p: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], lam: float) -> torch.Tensor:
    """AdamLH's update, float64, one parameter: decay by (1 - lam * lr_t / LR) first, then Adam with
    bias correction (denominator sqrt(v / (1 - b2^t)) + eps, step lr_t / (1 - b1^t))."""
    b1, b2 = BETAS
    p, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        p = p * (1 - lam * lr / LR)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - (lr / (1 - b1**t)) * m / ((v / (1 - b2**t)).sqrt() + EPS)
    return p


class Toy(nn.Module):
    """A decayed weight, one the loss ignores, and the three kinds the recipe exempts."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(4, 3, dtype=torch.float64)  # weight decayed, bias not
        self.unused = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))  # decayed, zero gradient
        self.pos_embed = nn.Parameter(torch.randn(1, 2, 4, generator=g, dtype=torch.float64))  # exempt by name
        self.norm = nn.LayerNorm(4, dtype=torch.float64)  # 1-D: exempt


def run_steps(model: nn.Module, optimizer, scheduler, grads: dict[str, list[torch.Tensor]]) -> list[float]:
    seen = []
    for t in range(TOTAL):
        seen.append(optimizer.param_groups[0]["lr"])
        for name, p in model.named_parameters():
            p.grad = grads[name][t].clone()
        optimizer.step()
        scheduler.step()
    return seen


def test_torch_weight_decay_is_lambda_over_the_initial_lr():
    assert decoupled_weight_decay(1e-4, 1e-3) == pytest.approx(0.1)  # AIMv2-L: 0.1, not 1e-4
    assert decoupled_weight_decay(1e-4, 4e-4) == pytest.approx(0.25)  # AIMv2-3B
    assert decoupled_weight_decay(1e-4, 0.0) == 0.0  # lr = 0: no decay either
    with pytest.raises(ValueError):
        decoupled_weight_decay(-1e-4, 1e-3)


def test_updates_match_adamlh_by_hand_over_warmup_and_cosine():
    model = Toy()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    grads = {
        n: [torch.randn(p.shape, generator=g, dtype=torch.float64) for _ in range(TOTAL)]
        for n, p in model.named_parameters()
    }
    grads["unused"] = [torch.zeros_like(model.unused) for _ in range(TOTAL)]
    grads["pos_embed"] = [torch.zeros_like(model.pos_embed) for _ in range(TOTAL)]  # exempt, zero grad: must not move
    optimizer = build_optimizer(model, LR, LAM, BETAS, EPS)
    scheduler = warmup_cosine_schedule(optimizer, WARMUP, TOTAL, LR, MIN_LR)["scheduler"]
    lrs = hand_lrs()
    assert run_steps(model, optimizer, scheduler, grads) == pytest.approx(lrs, rel=1e-12)

    decayed = {"proj.weight", "unused"}
    assert {n for n, _ in model.named_parameters()} - no_decay_names(model) == decayed
    for name, p in model.named_parameters():
        expected = adamlh(start[name], grads[name], lrs, LAM if name in decayed else 0.0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15, msg=name)
    # The ignored weight shrinks by exactly prod(1 - lambda * lr_t / lr_peak): 0.99955... here.
    shrink = math.prod(1 - LAM * lr / LR for lr in lrs)
    torch.testing.assert_close(model.unused.detach(), start["unused"] * shrink, rtol=1e-13, atol=0.0)
    assert 1 - shrink == pytest.approx(LAM * sum(lrs) / LR, rel=1e-3)  # about 4.5e-4 over these 8 steps
    assert torch.equal(model.pos_embed.detach(), start["pos_embed"])  # no decay, no gradient: untouched


def test_one_step_at_the_peak_shrinks_by_lambda_whatever_the_peak_lr():
    for lr in (1e-3, 4e-4, 5e-2):
        w = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
        optimizer = build_optimizer(nn.ParameterDict({"w": w}), lr, LAM, BETAS, EPS)
        w.grad = torch.zeros_like(w)
        optimizer.step()
        assert w.detach()[0, 0].item() == pytest.approx(1 - LAM, rel=1e-12), lr


def test_zero_lr_moves_nothing():
    model = Toy()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, 0.0, LAM, BETAS, EPS)
    scheduler = warmup_cosine_schedule(optimizer, WARMUP, TOTAL, 0.0, 0.0)["scheduler"]
    g = torch.Generator().manual_seed(2)
    grads = {
        n: [torch.randn(p.shape, generator=g, dtype=torch.float64) for _ in range(TOTAL)]
        for n, p in model.named_parameters()
    }
    assert run_steps(model, optimizer, scheduler, grads) == [0.0] * TOTAL
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), start[name]), name


def test_the_pretraining_module_hands_lambda_over_lr_to_adamw():
    from aimv2.pretraining.module import AIMv2PretrainModule

    module = AIMv2PretrainModule(
        {"size": "debug", "img_size": 28}, {}, {"lr": 2e-3, "weight_decay": 1e-4}, vocab_size=64, max_text_len=8
    )
    module._trainer = SimpleNamespace(
        strategy=None, datamodule=None, max_epochs=None, max_steps=100, precision="32-true"
    )
    optimizer = module.configure_optimizers()["optimizer"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [pytest.approx(0.05), 0.0]
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {n for n, p in module.model.named_parameters() if id(p) in decayed}
    assert "decoder.text_embed.weight" in names and "encoder.patch_embed.proj.weight" in names


def test_no_decay_split_is_ml_l3m_wd_exclude():
    """ml-l3m's configs/aimv2/001_aimv2_hfdata.yaml exempts names matching *bias*, *pos_embed*, *norm*,
    *cls_token*, *positional_embedding*; our names for its cls_token / positional_embedding are
    decoder.start_token / decoder.text_pos_embed. Everything else, the text embedding included, decays."""
    from fnmatch import fnmatch

    from aimv2.models import AIMv2, get_size

    model = AIMv2(get_size("debug"), 28, vocab_size=64, max_text_len=8)
    globs = ("*bias*", "*pos_embed*", "*norm*", "*start_token*")
    by_glob = {n for n, _ in model.named_parameters() if any(fnmatch(n, g) for g in globs)}
    assert no_decay_names(model) == by_glob
    assert {
        "encoder.pos_embed",
        "decoder.text_pos_embed",
        "decoder.start_token",
        "encoder.patch_embed.proj.bias",
    } <= by_glob


def test_compressor_groups_share_one_decay_and_the_llm_decays_at_its_lr_scale(tmp_path):
    from aimv2.compress.train import build_module
    from compress_utils import compress_config, write_encoder_checkpoint

    encoder = write_encoder_checkpoint(tmp_path / "enc.ckpt")
    cfg = compress_config(
        tmp_path,
        encoder,
        "unused",
        "stage=2",
        "compressor.kind=mlp",
        "compressor.num_tokens=0",
        "optim.lr=2e-3",
        "optim.weight_decay=1e-4",
        "optim.lm_lr_scale=0.25",
    )
    module = build_module(cfg)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, precision="32-true")
    optimizer = module.configure_optimizers()["optimizer"]
    rows = sorted((g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups)  # lr before warmup scaling
    # (lr, torch wd) of: LLM no-decay, LLM decay, compressor no-decay, compressor decay.
    assert rows == [(5e-4, 0.0), (5e-4, pytest.approx(0.05)), (2e-3, 0.0), (2e-3, pytest.approx(0.05))]
    # Per step at the peak: the compressor's weights shrink by 1e-4, the LLM's by 0.25 x 1e-4 (as AdamLH
    # with its lr_init = optim.lr and the LLM group at lm_lr_scale).
    assert [lr * wd for lr, wd in rows if wd] == [pytest.approx(0.25e-4), pytest.approx(1e-4)]


def test_cpu_adam_receives_the_same_groups(monkeypatch):
    """DeepSpeed's CPU Adam in adamw mode decays as torch does (param += -lr * wd * param, in
    csrc/includes/cpu_adam.h), so it gets the same lambda / lr groups; a stand-in records them
    (the real one compiles a C++ extension)."""
    seen = {}

    class RecordingCPUAdam:
        def __init__(self, groups, **kwargs):
            seen["groups"], seen["kwargs"] = groups, kwargs

    fake = types.ModuleType("deepspeed.ops.adam")
    fake.DeepSpeedCPUAdam = RecordingCPUAdam
    for name, module in (
        ("deepspeed", types.ModuleType("deepspeed")),
        ("deepspeed.ops", types.ModuleType("deepspeed.ops")),
        ("deepspeed.ops.adam", fake),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    build_optimizer(Toy(), 8e-4, LAM, BETAS, EPS, cpu_adam=True)
    assert [g["weight_decay"] for g in seen["groups"]] == [pytest.approx(0.125), 0.0]
    assert seen["kwargs"]["adamw_mode"] is True and seen["kwargs"]["lr"] == 8e-4


def test_pretraining_warmup_starts_where_ml_l3m_starts():
    """With a start lr (pre-training's optim.warmup_start_lr, 1e-6) the warmup is ml-l3m's fvcore
    LinearParamScheduler(start_value=1e-6, end_value=lr) over the warmup steps: start + (lr - start) * t / W,
    lr exactly at step W; then the same cosine. A start above lr is lowered to lr (a constant warmup)."""
    model = Toy()
    optimizer = build_optimizer(model, LR, LAM, BETAS, EPS)
    scheduler = warmup_cosine_schedule(optimizer, WARMUP, TOTAL, LR, MIN_LR, start_lr=1e-6)["scheduler"]
    seen = []
    for _ in range(TOTAL):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm = [1e-6 + (LR - 1e-6) * t / WARMUP for t in range(WARMUP)]  # 1e-6, lr/3 + ..., 2lr/3 + ...
    assert seen == pytest.approx(warm + hand_lrs()[WARMUP:], rel=1e-12)
    assert seen[0] == pytest.approx(1e-6, rel=1e-12)
    lowered = warmup_cosine_schedule(
        build_optimizer(Toy(), 1e-7, LAM, BETAS, EPS), WARMUP, TOTAL, 1e-7, 0.0, start_lr=1e-6
    )["scheduler"]
    assert lowered.get_last_lr()[0] == pytest.approx(1e-7, rel=1e-12)
