"""On a GPU only (marker `gpu`): the pre-training step runs without a single device-to-host sync
(torch's sync debug mode turns any into an error), and a NaN step is skipped on the device by fused
AdamW's found_inf without the host deciding. Figures: benchmarks/train_step.py --device cuda."""

import pytest
import torch

from aimv2.data.transforms import normalize_images
from aimv2.models import AIMv2, get_size
from aimv2.models.masks import sample_prefix_lengths
from aimv2.objective import aimv2_loss
from aimv2.engine.optim import build_optimizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def batch(device):
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(8)[None, :] < torch.tensor([3, 8, 5, 1])[:, None]
    return {"image": torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=g).pin_memory().to(device, non_blocking=True),
            "tokens": torch.randint(1, 50, (4, 8), generator=g).pin_memory().to(device, non_blocking=True),
            "token_mask": mask.pin_memory().to(device, non_blocking=True),
            "token_index": mask.flatten().nonzero().squeeze(1).pin_memory().to(device, non_blocking=True)}


def step(model, optimizer, b, device, poison=False):
    images = normalize_images(b["image"])
    if poison:
        images = images * float("nan")
    prefix = sample_prefix_lengths(4, model.num_patches, generator=torch.Generator().manual_seed(1))
    prefix = prefix.pin_memory().to(device, non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pixels, logits = model(images, b["tokens"], prefix, b["token_mask"], b["token_index"])
        loss = aimv2_loss(pixels, logits, images, b["tokens"], b["token_mask"], prefix, 14,
                          token_index=b["token_index"]).total
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    ok = torch.isfinite(loss.detach()) & torch.isfinite(torch.nn.utils.get_total_norm(grads))
    optimizer.found_inf = (~ok).float().reshape(())  # what AIMv2PretrainModule does with fused AdamW
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_training_step_has_no_host_sync_and_skips_nan_on_the_device():
    device = torch.device("cuda")
    model = AIMv2(get_size("debug"), 56, vocab_size=50, max_text_len=8).to(device)
    optimizer = build_optimizer(model, 1e-3, 1e-4, (0.9, 0.95), 1e-8)
    assert optimizer.defaults["fused"]
    b = batch(device)
    step(model, optimizer, b, device)  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(model, optimizer, b, device)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step(model, optimizer, b, device, poison=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the NaN step changed nothing
