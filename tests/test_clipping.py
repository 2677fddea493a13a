"""Gradient clipping by norm under every precision and strategy (aimv2.engine.optim): hand-computed
norms, the DeepSpeed and FSDP dispatch, and real runs in bf16 autocast with the fused optimizer (the
combination Lightning refuses) and fp16 with a GradScaler (clipped after unscaling: the logged norm is
the fp32 run's, not 65536 times it)."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from aimv2.config import load_config
from aimv2.engine.logs import read_metric
from aimv2.engine.optim import clip_gradient_norm, fused_optimizer_allowed
from aimv2.pretraining.pretrain import pretrain
from conftest import REPO, write_caption_shards


def _params_with_grads():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # total norm sqrt(9 + 16 + 144) = 13
    return a, b, torch.optim.SGD([a, b], lr=0.1)


def test_clips_to_the_hand_computed_norm():
    a, b, opt = _params_with_grads()
    norm = clip_gradient_norm(SingleDeviceStrategy("cpu"), opt, 1.3)
    assert norm.item() == pytest.approx(13.0)
    scale = 1.3 / (13.0 + 1e-6)  # torch's clip coefficient
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) * scale) and torch.allclose(
        b.grad, torch.tensor([12.0]) * scale
    )
    a, b, opt = _params_with_grads()
    assert clip_gradient_norm(SingleDeviceStrategy("cpu"), opt, 0.0) is None  # disabled: untouched
    assert a.grad.tolist() == [3.0, 4.0]


def test_deepspeed_clips_itself_and_fsdp_clips_through_its_root_module():
    pytest.importorskip("deepspeed")
    a, _, opt = _params_with_grads()
    assert clip_gradient_norm(DeepSpeedStrategy(), opt, 1.0) is None and a.grad.tolist() == [3.0, 4.0]
    calls = []
    fsdp = FSDPStrategy()
    fsdp._model = SimpleNamespace(clip_grad_norm_=lambda max_norm: calls.append(max_norm) or torch.tensor(13.0))
    assert clip_gradient_norm(fsdp, opt, 2.0).item() == 13.0 and calls == [2.0]


def test_only_loss_scaled_precision_rules_out_the_fused_optimizer():
    assert fused_optimizer_allowed("bf16-mixed") and fused_optimizer_allowed("32-true")
    assert not fused_optimizer_allowed("16-mixed")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_caption_shards(tmp_path_factory.mktemp("clip") / "shards", n=16, per_shard=16)


def _first_grad_norm(tmp_path, shards, precision: str, strategy: str) -> float:
    cfg = load_config(
        REPO / "configs/pretrain/debug.yaml",
        [
            f"run_dir={tmp_path / precision}",
            f"data.sources=[{{urls: '{shards.urls}'}}]",
            "model.img_size=28",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "data.tokenizer.max_length=8",
            "optim.grad_clip=0.5",
            f"trainer.precision={precision}",
            f"trainer.strategy={strategy}",
            "trainer.devices=1",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
        ],
    )
    try:
        paths = pretrain(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if precision == "16-mixed":  # fp16 really ran (Lightning alone would have swapped in bf16 on the CPU)
        ckpt = torch.load(paths.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["MixedPrecision"]["scale"] > 1  # the GradScaler's state
    norms = read_metric(paths.metrics, "train/grad_norm")
    assert [s for s, _ in norms] == [0, 1]
    return norms[0][1]


def test_bf16_with_fused_adamw_and_fp16_with_a_scaler_clip_the_true_norm(tmp_path, shards):
    fp32 = _first_grad_norm(tmp_path, shards, "32-true", "auto")
    assert fp32 > 0.5  # the clip is active
    # bf16 autocast under DDP with fused AdamW: the step-1 crash of every paper recipe before the fix.
    assert _first_grad_norm(tmp_path, shards, "bf16-mixed", "ddp") == pytest.approx(fp32, rel=0.05)
    # fp16: the GradScaler multiplies the loss by 65536; the clip sees the unscaled gradients.
    assert _first_grad_norm(tmp_path, shards, "16-mixed", "auto") == pytest.approx(fp32, rel=0.05)
