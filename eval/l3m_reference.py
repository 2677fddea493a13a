"""Apple's reference trainer, ml-l3m, driven from outside: its AIMv2 model, loss, AdamLH optimizer,
fvcore schedule and training loop, built from a checkout the user fetched (eval/parity_l3m.py compares
them with this project's). Nothing of ml-l3m is copied here; `import_l3m` makes its modules importable
and names the packages they need beyond this project's (hydra-core, fvcore)."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import types
import warnings
from pathlib import Path

import torch

CONFIG = "configs/aimv2/001_aimv2_hfdata.yaml"
PAD = 1  # SigLIP's pad = end-of-caption id, ml-l3m's `constants.pad_token`
NEEDED = {"hydra": "hydra-core", "fvcore": "fvcore", "omegaconf": "omegaconf", "timm": "timm"}


# -- ml-l3m, imported from the user's checkout --------------------------------------------------------


def import_l3m(root: Path) -> None:
    """Make `l3m` importable from ROOT/src without running its package __init__, which imports its data
    and logging stacks (datasets, wandb) that the model, loss and optimizer do not use."""
    missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(
            f"parity_l3m: ml-l3m's model and optimizer need {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    src = root / "src" / "l3m"
    if not (src / "model" / "meta_models.py").is_file() or not (root / CONFIG).is_file():
        raise SystemExit(f"parity_l3m: {root} is not a checkout of github.com/apple/ml-l3m (no src/l3m or {CONFIG})")
    package = types.ModuleType("l3m")
    package.__path__ = [str(src)]
    sys.modules["l3m"] = package
    warnings.filterwarnings("ignore", module="l3m")
    warnings.filterwarnings("ignore", message=".*register_new_resolver.*")


def swiglu_multiple(width: int, hidden: int) -> int:
    """The `multiple_of` that makes ml-l3m's SwiGLUFFN (hidden = int(2 * 4 * width / 3) rounded up to a
    multiple) give `hidden`: its default 256 for every size of the paper (2816 at L) and for `tiny`."""
    for multiple in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if multiple * math.ceil(int(2 * 4 * width / 3) / multiple) == hidden:
            return multiple
    raise SystemExit(f"parity_l3m: ml-l3m's SwiGLU cannot have {hidden} hidden units at width {width}")


def l3m_config(root: Path, spec, img_size: int, vocab: int, text_len: int, pad: int = PAD):
    """Their AIMv2 config with its constants set to this size."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(root / CONFIG)
    c = cfg.constants
    c.vision_embed_dim, c.vision_num_blocks, c.vision_num_heads = spec.width, spec.depth, spec.heads
    c.text_embed_dim, c.text_num_blocks, c.text_num_heads = spec.decoder_width, spec.decoder_depth, spec.decoder_heads
    c.text_vocab_size, c.context_length, c.img_size, c.pad_token = vocab, text_len, img_size, pad
    c.num_patches = (img_size // spec.patch_size) ** 2
    c.prefix_range = [1, c.num_patches - 1]
    models = cfg.model.meta_model.models
    for trunk, width, hidden in (
        (models.image_encoder.trunk, spec.width, spec.mlp_hidden),
        (models.text_decoder.trunk, spec.decoder_width, spec.decoder_mlp_hidden),
    ):
        multiple = swiglu_multiple(width, hidden)
        if multiple != 256:  # a toy width: their constructor's argument, not a change to their code
            trunk.ffn_target.multiple_of = multiple
    if img_size != 224:  # their RasterPixelLoss patchifies a 224 grid unless told (their config never says)
        cfg.loss.criteria[0].image_size = img_size
    return cfg


def build_l3m(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg.model.meta_model), instantiate(cfg.loss)


def l3m_optimizer(model, cfg, steps: int, warmup: int):
    """Their optimizer from their config (create_optimizer: AdamLH over their wd_exclude groups) and their
    scheduler with its two lengths shrunk to `warmup` and `steps - warmup`, made relative as their
    run/runner.py does before instantiating it."""
    from hydra.utils import instantiate
    from l3m.optim.optimizer import create_optimizer
    from omegaconf import OmegaConf

    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim.update(freeze_list=None, unfreeze_list=None, probe_hparam_search=False, lr_decay=None, lr_scalers=None)
    optimizer, _ = create_optimizer(model, {**optim, "optimizer": cfg.optim.optimizer})
    scheduler_cfg = cfg.optim.scheduler.copy()
    scheduler_cfg.lengths = [warmup / steps, (steps - warmup) / steps]
    scheduler_cfg.pop("absolute_lengths")
    return optimizer, instantiate(scheduler_cfg)


def l3m_step(
    model,
    loss_fn,
    optimizer,
    scheduler,
    batch: dict,
    iteration: int,
    total: int,
    clip: float,
    jitter: torch.Generator | None = None,
) -> dict:
    """One iteration of their loop (src/l3m/engine.py `train`), fp32 and one process: schedule at
    where = iteration / total, forward, loss, backward, clip the norm of all gradients, step.
    `jitter`: multiply every gradient element by (1 + 1e-7 * N(0, 1)) first, float32 rounding's size
    (the control run that measures how much 10 Adam steps amplify rounding alone)."""
    from l3m.optim.scaler import NativeScaler
    from l3m.optim.scheduler import step_scheduler

    step_scheduler(lr_scheduler=scheduler, optimizer=optimizer, where=float(iteration) / total)
    scaler = NativeScaler(enabled=False)  # fp32: their scaler only unscales (nothing), clips and steps
    data = l3m_batch(batch)
    out = model(data)
    loss, _ = loss_fn(out, model=model)
    scaler.backward(loss)
    if jitter is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1 + 1e-7 * torch.randn(p.grad.shape, generator=jitter))
    scaler(optimizer, clip_grad=clip, model=model)
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"]}


def l3m_batch(batch: dict) -> dict:
    """Their data dict: the image, the caption ids and the prefix mask (False on the prefix)."""
    images, prefix = batch["image"], batch["prefix"]
    num_patches = batch["num_patches"]
    mask = torch.arange(num_patches)[None, :] >= prefix[:, None]  # (B, N)
    return {"image": images, "text": batch["tokens"], "encoder_prefix_mask": mask}


def l3m_terms(model, loss_fn, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, image, text) of their loss on a batch, with the graph."""
    out = model(l3m_batch(batch))
    image, _ = loss_fn.criteria[0](out)
    text, _ = loss_fn.criteria[1](out)
    total, _ = loss_fn(out, model=model)
    return total, image, text


def train_l3m(root: Path, cfg, seed: int) -> dict:
    """ml-l3m's model, loss and optimizer (built from their config at the demo's size and with the demo's
    optimizer values) trained in their loop on the batches of this project's own stream for the same
    config and seed: the same images and captions in the same order. Their prefix lengths come from their
    own `RandomRasterMasking`, their init from their modules. Returns this project's AIMv2 state dict of
    the result (`l3m_to_module`) and the last losses."""
    from hydra.utils import instantiate

    from aimv2.checkpoints.convert import l3m_to_module
    from aimv2.models import get_size
    from aimv2.pretraining.pretrain import PretrainDataModule

    torch.manual_seed(seed)
    data = PretrainDataModule(cfg.data, cfg.model.img_size)
    spec, steps = get_size(cfg.model.size), cfg.trainer.max_steps
    text_len = cfg.data.tokenizer.max_length
    l3m_cfg = l3m_config(root, spec, cfg.model.img_size, data.vocab_size, text_len, pad=data.tokenizer.pad_id)
    opt = l3m_cfg.optim
    opt.optimizer.lr, opt.optimizer.weight_decay = cfg.optim.lr, cfg.optim.weight_decay
    opt.optimizer.betas, opt.optimizer.eps = list(cfg.optim.betas), cfg.optim.eps
    opt.scheduler.schedulers[1].end_value = cfg.optim.min_lr
    opt.scheduler.schedulers[0].start_value = cfg.optim.warmup_start_lr
    model, loss_fn = build_l3m(l3m_cfg)
    optimizer, scheduler = l3m_optimizer(model, l3m_cfg, steps, cfg.optim.warmup_steps)
    masking = instantiate(l3m_cfg.constants.train_generators[0], seed=seed)
    data.setup("fit")
    losses, started = [], time.perf_counter()
    for step, batch in enumerate(data.train_dataloader()):
        if step == steps:
            break
        batch = data.on_after_batch_transfer(batch, 0)
        mask = torch.stack([masking() for _ in range(batch["image"].shape[0])])  # (B, N), False on the prefix
        prefix = (~mask).sum(1)
        num_patches = mask.shape[1]
        record = l3m_step(
            model,
            loss_fn,
            optimizer,
            scheduler,
            {"image": batch["image"], "tokens": batch["tokens"], "prefix": prefix, "num_patches": num_patches},
            step,
            steps,
            cfg.optim.grad_clip,
        )
        losses.append(record["loss"])
    state = l3m_to_module({k: v.detach() for k, v in model.state_dict().items()}, text_len)
    return {
        "state": state,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": time.perf_counter() - started,
    }
