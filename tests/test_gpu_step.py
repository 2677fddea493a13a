"""On a GPU only (marker `gpu`): the pre-training step runs without a single device-to-host sync
(torch's sync debug mode turns any into an error), and a NaN step is skipped on the device by fused
AdamW's found_inf without the host deciding. Figures: benchmarks/train_step.py --device cuda.

The step is AIMv2PretrainModule's own: its optimizer (configure_optimizers), training_step, NaN guard
(on_before_optimizer_step) and clipping hook, called in the order Lightning calls them. Only the
Trainer is a stand-in, so that sync debug mode sees the module's work and not Lightning's logging."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from aimv2.pretraining.module import AIMv2PretrainModule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def attach_stand_in_trainer(module: AIMv2PretrainModule, device: torch.device) -> torch.optim.Optimizer:
    """What the module's hooks read from a Trainer: its strategy (holding the optimizer), precision,
    world size and step budget. `barebones` turns `self.log` into a no-op (Lightning's logging reads
    values back to the host; the module's step must not)."""
    strategy = SingleDeviceStrategy(device)
    module.trainer = SimpleNamespace(
        barebones=True,
        strategy=strategy,
        precision="bf16-mixed",
        world_size=1,
        datamodule=None,
        max_epochs=None,
        max_steps=10,
        global_step=0,
    )
    optimizer = module.configure_optimizers()["optimizer"]
    strategy.optimizers = [optimizer]  # what module.optimizers() returns
    module.on_train_start()
    return optimizer


def batch(device, seed: int):
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(8)[None, :] < torch.tensor([3, 8, 5, 1])[:, None]
    on = dict(device=device, non_blocking=True)
    return {
        "image": torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=g).pin_memory().to(**on),
        "tokens": torch.randint(1, 50, (4, 8), generator=g).pin_memory().to(**on),
        "token_mask": mask.pin_memory().to(**on),
        "token_index": mask.flatten().nonzero().squeeze(1).pin_memory().to(**on),
        "seed": seed,
        "skipped": 0,
        "shard_errors": 0,
    }


def step(module: AIMv2PretrainModule, optimizer, b: dict, poison: bool = False) -> None:
    """One optimizer step as Lightning runs it: on_after_batch_transfer's normalization, training_step
    under bf16 autocast, backward, on_before_optimizer_step, the clipping hook, the optimizer step."""
    from aimv2.data.samples import normalize_images

    b = dict(b, image=normalize_images(b["image"]))
    if poison:
        b["image"] = b["image"] * float("nan")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.training_step(b, 0)
    loss.backward()
    module.on_before_optimizer_step(optimizer)
    module.configure_gradient_clipping(optimizer, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_training_step_has_no_host_sync_and_skips_nan_on_the_device():
    device = torch.device("cuda")
    module = AIMv2PretrainModule(
        {"size": "debug", "img_size": 56}, {}, {"lr": 1e-3, "warmup_steps": 0}, vocab_size=50, max_text_len=8
    ).to(device)
    optimizer = attach_stand_in_trainer(module, device)
    assert optimizer.defaults["fused"]  # the guard decides on the device only with a fused optimizer
    step(module, optimizer, batch(device, 0))  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(module, optimizer, batch(device, 1))
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        step(module, optimizer, batch(device, 2), poison=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())  # the NaN step changed nothing
    module.on_save_checkpoint({})  # reads the flags still on their way to the host
    assert module.nonfinite_total == 1  # and the module counted it
