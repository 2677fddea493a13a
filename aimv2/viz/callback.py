"""The training callback that draws a prediction frame every N optimizer steps.

Frames are comparable over a run because they always show the same images: the first training
batch is captured once (its first `num_images` samples, after augmentation) and saved as
RUN/visualizations/fixed_batch.pt, which a resumed run loads instead of capturing a new one; or the
image files listed in `visualize.images` (held-out images, captions from a sibling .txt file).

Output, from rank 0: RUN/visualizations/step=NNNNNNN.png (step 0 = the untrained model, then every
`every_n_steps`, and the last step), and in TensorBoard the image "predictions" and the text
"captions" (true vs greedy captions). Every rank runs the forward passes, because under FSDP or
ZeRO-3 a forward is a collective call that would hang if rank 0 ran it alone; they are a few images.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from aimv2.config import VisualizeConfig
from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.engine.run_dir import RunDir
from aimv2.fileio import atomic_write
from aimv2.viz.frame import Frame, make_frame
from aimv2.viz.prediction_grid import save_png

FIXED_BATCH = "fixed_batch.pt"


def frame_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step={step:07d}.png"


class PredictionFrames(Callback):
    """Draws, writes and logs a frame at step 0, every `every_n_steps` and at the end (see the module doc)."""

    def __init__(self, cfg: VisualizeConfig, out_dir: str | Path, tokenizer: CaptionTokenizer | None = None):
        self.cfg, self.out_dir, self.tokenizer = cfg, Path(out_dir), tokenizer
        self.batch: dict | None = None
        self.last_step: int | None = None

    # -- the fixed batch ---------------------------------------------------------------------
    def _load_fixed(self, img_size: int) -> dict | None:
        if self.cfg.images:
            from aimv2.viz.checkpoint import load_images

            images, captions = load_images(self.cfg.images, img_size, "visualize.images")
            return {"image": images, "captions": captions}
        path = self.out_dir / FIXED_BATCH
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        return None

    def _capture(self, trainer, batch: dict) -> dict:
        k = self.cfg.num_images
        if "patches" in batch:  # packed native rows: the first images of the first image's grid
            images, chosen = packed_images(batch, trainer.lightning_module.model.patch_size, k)
        else:
            images, chosen = batch["image"][:k], list(range(min(k, batch["image"].shape[0])))
        fixed = {"image": images.detach().float().cpu().clone()}
        if self.tokenizer is not None and "tokens" in batch:
            ids, mask = batch["tokens"][chosen].cpu(), batch["token_mask"][chosen].cpu()
            fixed["captions"] = [self.tokenizer.decode(row[m].tolist()) for row, m in zip(ids, mask)]
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(fixed, buf)
            atomic_write(self.out_dir / FIXED_BATCH, buf.getvalue())
        return fixed

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.cfg.every_n_steps > 0:
            self.batch = self._load_fixed(pl_module.model.img_size)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.cfg.every_n_steps <= 0:
            return
        if self.batch is None:
            self.batch = self._capture(trainer, batch)
        if trainer.global_step == 0 and self.last_step is None:
            self._draw(trainer, pl_module)  # the untrained model: the baseline frame

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.cfg.every_n_steps > 0 and step % self.cfg.every_n_steps == 0 and step != self.last_step:
            self._draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.every_n_steps > 0 and self.batch is not None and trainer.global_step != self.last_step:
            self._draw(trainer, pl_module)

    # -- drawing -----------------------------------------------------------------------------
    def _draw(self, trainer, pl_module) -> None:
        step = self.last_step = trainer.global_step
        frame = make_frame(
            pl_module.model,
            self.batch["image"],
            self.cfg.prefix_ratio,
            tokenizer=self.tokenizer,
            true_captions=self.batch.get("captions"),
            max_caption_tokens=self.cfg.max_caption_tokens,
            stop_early=trainer.world_size == 1,
        )
        if trainer.is_global_zero:
            self._write(trainer, frame, step)

    def _write(self, trainer, frame: Frame, step: int) -> None:
        save_png(frame.image, frame_path(self.out_dir, step))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                pixels = torch.from_numpy(np.array(frame.image)).permute(2, 0, 1)  # (3, H, W) uint8, a writable copy
                logger.experiment.add_image("predictions", pixels, step)
                logger.experiment.add_text("captions", frame.captions_markdown(), step)


def visualization_callbacks(
    cfg: VisualizeConfig, run: RunDir, tokenizer: CaptionTokenizer | None = None
) -> list[Callback]:
    """The callbacks for `build_trainer(extra_callbacks=...)`: none when `visualize.every_n_steps` is 0
    (the section's values are checked by `VisualizeConfig.validate` when the config loads)."""
    if cfg.every_n_steps <= 0:
        return []
    return [PredictionFrames(cfg, run.visualizations, tokenizer)]


def packed_images(batch: dict, patch: int, k: int) -> tuple[torch.Tensor, list[int]]:
    """Up to k images of a packed batch (aimv2.models.native) that share the first image's grid, as
    (k, 3, gh*p, gw*p) normalized pixels, and their indices: a frame stacks images of one size."""
    grids, starts = [tuple(g) for g in batch["grids"]], batch["layout"]["image_start"].tolist()
    flat = batch["patches"].flatten(0, 1)  # (R*T, p*p*3), patchify's (row, column, channel) order
    gh, gw = grids[0]
    chosen = [i for i, grid in enumerate(grids) if grid == grids[0]][:k]
    images = [
        flat[starts[i] : starts[i] + gh * gw]
        .reshape(gh, gw, patch, patch, 3)
        .permute(4, 0, 2, 1, 3)
        .reshape(3, gh * patch, gw * patch)
        for i in chosen
    ]
    return torch.stack(images), chosen
