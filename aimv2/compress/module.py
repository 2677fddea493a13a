"""The alignment LightningModule: caption loss through the attached LM; only the compressor trains
(stage 1), or the compressor and the LM (stage 2, the LM at `optim.lm_lr_scale` of the lr). The loss is
the global batch's mean cross-entropy per caption token under data parallelism (aimv2.objective.global_mean).

Checkpoints hold the trainable weights and the module's sections (stage, encoder, compressor, lm,
text, optim, seed) as plain dicts. The frozen encoder is left out (it is rebuilt from
`encoder.source`), and so is a frozen LM loaded from `lm.path`; a randomly initialized or trained LM
is kept. `aimv2 compress export` makes a self-contained bundle.

The optimizer is pre-training's (aimv2.engine.optim): AdamW with fully decoupled weight decay, whose
no-decay names are taken from the plain modules at construction (FSDP wraps before configure_optimizers),
and DeepSpeed's CPU Adam when the strategy offloads the optimizer (`optimizer_options`).

Image-caption batches for alignment, through the pre-training pipeline (shard lists, the
`ShardStream`, sample decoding, caption tokenizer), with the encoder's eval preprocessing
(resize + center crop, no augmentation, as in LLaVA's alignment stage).

Training streams shards in resampled mode (infinite; `trainer.max_steps` ends the run) and resumes
exactly at the batch a checkpoint was taken after, as pre-training does. Held-out
evaluation reads every sample exactly once, in order, including the last partial batch, through the
evaluation reader probes and pre-training's validation use too (aimv2.data.every_sample).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import asdict

import lightning as L
import torch
from torch.utils.data import DataLoader

from aimv2.checkpoints import schema
from aimv2.compress.config import (
    CompressDataSection,
    CompressOptimSection,
    CompressorSection,
    EncoderSection,
    LMSection,
    TextSection,
)
from aimv2.compress.vlm import build_attachment
from aimv2.config import as_section
from aimv2.data.every_sample import every_sample_loader, plan_whole_shards
from aimv2.data.samples import ImageCaptionCollator, ImageCaptionProcessor, eval_transform
from aimv2.data.shardlist import check_first_shard, resolve_shards
from aimv2.data.stream import ShardStream, StreamSource
from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.engine.logs import RankCounters
from aimv2.engine.optim import (
    ClipGradientNorm,
    decoupled_weight_decay,
    make_optimizer,
    no_decay_names,
    optimizer_options,
    param_groups,
    warmup_cosine_schedule,
)
from aimv2.engine.stream_resume import StreamDataModule
from aimv2.errors import UserError
from aimv2.objective import global_mean

SECTIONS = {
    "encoder": EncoderSection,
    "compressor": CompressorSection,
    "lm": LMSection,
    "text": TextSection,
    "optim": CompressOptimSection,
}


class CompressModule(ClipGradientNorm, L.LightningModule):
    """Receives the sections it needs, as dataclasses or as the plain dicts a checkpoint holds.
    `config` is the whole tree that checkpoints written before the split held; they still load."""

    def __init__(
        self,
        stage: int = 1,
        encoder: EncoderSection | dict | None = None,
        compressor: CompressorSection | dict | None = None,
        lm: LMSection | dict | None = None,
        text: TextSection | dict | None = None,
        optim: CompressOptimSection | dict | None = None,
        seed: int = 0,
        config: dict | None = None,
    ):
        super().__init__()
        if config is not None:  # an old checkpoint's hyper-parameters: the whole config tree
            stage, seed = int(config.get("stage", stage)), int(config.get("trainer", {}).get("seed", seed))
            encoder, compressor, lm, text, optim = (config.get(name) for name in SECTIONS)
        given = {"encoder": encoder, "compressor": compressor, "lm": lm, "text": text, "optim": optim}
        sections = {name: as_section(cls, given[name]) for name, cls in SECTIONS.items()}
        # Plain dicts in the checkpoint: it reloads with weights_only=True and without this package's classes.
        self.save_hyperparameters({"stage": stage, **{k: asdict(v) for k, v in sections.items()}, "seed": seed})
        self.stage, self.seed = stage, seed
        self.encoder_cfg, self.compressor_cfg, self.lm_cfg, self.text_cfg, self.optim_cfg = sections.values()
        self.vlm, self.tokenizer = build_attachment(
            stage, self.encoder_cfg, self.compressor_cfg, self.lm_cfg, self.text_cfg
        )
        # Which weights decay, decided now on the plain modules: under FSDP configure_optimizers runs after
        # wrapping, when the parameters are flat 1-D shards whose shapes no longer tell (as in pre-training).
        self._no_decay = {"compressor": no_decay_names(self.vlm.compressor), "lm": no_decay_names(self.vlm.lm)}
        self.strict_loading = False  # frozen parts are rebuilt from their sources, not the checkpoint
        self.rank_counters = RankCounters("skipped_samples")

    def attachment_config(self) -> dict:
        """The sections that define the attachment, as plain data (a bundle's record of how it was made)."""
        return {"stage": self.stage, **{k: self.hparams[k] for k in ("encoder", "compressor", "lm", "text")}}

    # -- what a checkpoint holds ---------------------------------------------------------------
    def _frozen_prefixes(self) -> tuple[str, ...]:
        prefixes = ["vlm.encoder."]
        if self.stage == 1 and self.lm_cfg.path:
            prefixes.append("vlm.lm.")
        return tuple(prefixes)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = self._frozen_prefixes()
        checkpoint["state_dict"] = {k: v for k, v in schema.model_state(checkpoint).items() if not k.startswith(frozen)}
        schema.write(checkpoint, job="compress")
        self.rank_counters.save(self._trainer, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        schema.read(checkpoint, getattr(self._trainer, "ckpt_path", None) or "the checkpoint")
        self.rank_counters.restore(self._trainer, checkpoint)
        state = schema.model_state(checkpoint)
        frozen = self._frozen_prefixes()
        missing = [k for k in self.state_dict() if not k.startswith(frozen) and k not in state]
        if missing:
            raise UserError(f"checkpoint lacks {len(missing)} trained weights of this config (first: {missing[0]})")

    # -- training --------------------------------------------------------------------------------
    def _draw_num_tokens(self) -> None:
        """Matryoshka-style: M for this step, the same on every rank and after a resume (seeded by step)."""
        choices = self.compressor_cfg.train_tokens
        if choices:
            draw = random.Random(f"{self.seed}-{self.global_step}")
            self.vlm.compressor.set_num_tokens(draw.choice(choices))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._draw_num_tokens()
        ce, n = self.vlm.caption_loss(batch["image"], batch["tokens"], batch["token_mask"])
        # Mean cross-entropy per caption token of the GLOBAL batch: ranks hold different numbers of tokens, so
        # each divides its sum by the all-reduced count (times the world size the gradient average divides by).
        loss, logged = global_mean(ce, n, self.trainer.world_size)
        self.log("train/caption_loss", logged, prog_bar=True)
        self.log("train/num_tokens", float(self.vlm.compressor.num_tokens))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        skipped = self.rank_counters.add("skipped_samples", batch["skipped"])
        self.log("data/skipped_samples", skipped.float(), reduce_fx="sum", sync_dist=True)
        return loss

    def configure_optimizers(self):
        cfg = self.optim_cfg
        # Fully decoupled decay as in pre-training; one value for every group (AdamLH divides by the
        # optimizer's lr), so the LLM at lm_lr_scale x lr also decays at lm_lr_scale x weight_decay.
        wd = decoupled_weight_decay(cfg.weight_decay, cfg.lr)
        groups = [g | {"lr": cfg.lr} for g in param_groups(self.vlm.compressor, wd, self._no_decay["compressor"])]
        if self.stage == 2:
            lm_lr = cfg.lr * cfg.lm_lr_scale
            groups += [g | {"lr": lm_lr} for g in param_groups(self.vlm.lm, wd, self._no_decay["lm"])]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise UserError(f"compressor '{self.compressor_cfg.kind}' has nothing to train in stage {self.stage}")
        # DeepSpeed's CPU Adam under optimizer offload, else fused AdamW where the precision allows: as pre-training.
        optimizer = make_optimizer(groups, cfg.lr, cfg.betas, cfg.eps, **optimizer_options(self.trainer))
        total = int(min(self.trainer.estimated_stepping_batches, 2**62))
        return {
            "optimizer": optimizer,
            "lr_scheduler": warmup_cosine_schedule(optimizer, cfg.warmup_steps, total, cfg.lr, cfg.min_lr),
        }


def load_module(path: str, map_location: str = "cpu") -> CompressModule:
    """A trained attachment from an `aimv2 compress train` checkpoint (a UserError naming it otherwise)."""
    from pathlib import Path

    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means not a checkpoint we can read
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    hparams = schema.hyper_parameters(raw) if isinstance(raw, dict) else {}
    if not ("compressor" in hparams or "config" in hparams):
        raise UserError(f"{path}: not an `aimv2 compress train` checkpoint (no config in its hyper-parameters)")
    schema.check_version(raw, path)
    with warnings.catch_warnings():  # the frozen encoder is rebuilt from encoder.source, not missing
        warnings.filterwarnings("ignore", message=".*in the model state dict but not in the checkpoint.*")
        module = CompressModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return module.eval()


def processor(preprocessing) -> ImageCaptionProcessor:
    return ImageCaptionProcessor(eval_transform(preprocessing.img_size, preprocessing.mean, preprocessing.std))


class AlignmentDataModule(StreamDataModule):
    """The training stream, resampled; it continues exactly after a resume, as pre-training's does
    (aimv2.engine.stream_resume)."""

    def __init__(self, cfg: CompressDataSection, tokenizer: CaptionTokenizer, preprocessing):
        super().__init__(cfg.num_workers)
        self.cfg, self.tokenizer, self.preprocessing = cfg, tokenizer, preprocessing
        check_first_shard(cfg.train, "data.train")  # a mistyped directory fails before any model is built

    def resolve_sources(self) -> list[StreamSource]:
        return [StreamSource("train", resolve_shards(self.cfg.train, "data.train", need_counts=False))]

    def build_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        cfg = self.cfg
        return ShardStream(
            self.resolved_sources(),
            process=processor(self.preprocessing),
            collate=ImageCaptionCollator(self.tokenizer),
            batch_size=cfg.batch_size,
            mode="resampled",
            rank=rank,
            world_size=world_size,
            num_workers=cfg.num_workers,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
        )


def held_out_loader(
    spec: str, key: str, tokenizer: CaptionTokenizer, preprocessing, batch_size: int, num_workers: int
) -> DataLoader:
    """Every held-out sample once, in order (aimv2.data.every_sample: whole shards over `num_workers`
    workers), with the eval preprocessing."""
    if not spec:
        raise UserError(f"{key}: no held-out shards given (e.g. {key}='/data/cc_val/{{00000..00003}}.tar')")
    shards = resolve_shards(spec, key, need_counts=False)
    return every_sample_loader(
        plan_whole_shards(shards, 1, num_workers), processor(preprocessing), ImageCaptionCollator(tokenizer), batch_size
    )
