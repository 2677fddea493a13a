"""The pre-training LightningDataModule: image-caption batches streamed from shard sources."""

from __future__ import annotations

import lightning as L
import torch

from aimv2.config import DataConfig
from aimv2.data.image_caption import ImageCaptionCollator, ImageCaptionProcessor
from aimv2.data.samples import decode_image_tensor
from aimv2.data.shardlist import resolve_shards
from aimv2.data.stream import EpochAwareLoader, ShardStream, StreamSource
from aimv2.data.tokenizer import build_tokenizer
from aimv2.data.transforms import normalize_images, pretrain_transform
from aimv2.errors import UserError


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, img_size: int):
        super().__init__()
        self.cfg, self.img_size = cfg, img_size
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        # Resolve shards now: a missing shard is reported before any model is built.
        self.sources = [
            StreamSource(src.name or f"source{i}",
                         resolve_shards(src.urls, f"data.sources.{i}.urls", need_counts=cfg.mode == "epoch"),
                         src.weight)
            for i, src in enumerate(cfg.sources)
        ]
        self.stream: ShardStream | None = None
        self.loader: EpochAwareLoader | None = None
        self._position: dict | None = None  # a restored stream position, for the loader to come

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def build_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        cfg = self.cfg
        try:
            return ShardStream(
                self.sources,
                process=ImageCaptionProcessor(pretrain_transform(self.img_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip),
                                              decode=decode_image_tensor),
                collate=ImageCaptionCollator(self.tokenizer),
                batch_size=cfg.batch_size, mode=cfg.mode, rank=rank, world_size=world_size,
                num_workers=cfg.num_workers, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
            )
        except ValueError as err:
            raise UserError(f"data: {err}") from None

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.stream = self.build_stream(rank, world)

    def train_dataloader(self) -> EpochAwareLoader:
        trainer = self.trainer
        self.loader = EpochAwareLoader(self.stream, num_workers=self.cfg.num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
                                       gather=self._gather if trainer is not None else None)
        if self._position is not None:
            self.loader.load_position_state(self._position)
            self._position = None
        return self.loader

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 images from the workers become normalized floats here, on the training device."""
        batch["image"] = normalize_images(batch["image"])
        return batch

    # -- where the stream stands, in every checkpoint (exact resume) -------------------------
    def state_dict(self) -> dict:
        return {"stream": self.loader.position_state()} if self.loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Called by Lightning on resume, before the loader exists (or before its first batch)."""
        if "stream" not in state:
            return
        if self.loader is not None:
            self.loader.load_position_state(state["stream"])
        else:
            self._position = state["stream"]

    def _gather(self, table: torch.Tensor) -> torch.Tensor:
        """(world, ...) from every rank's `table`; a collective, called by all ranks at checkpoint time."""
        strategy = self.trainer.strategy
        if self.trainer.world_size == 1:
            return table[None]
        return strategy.all_gather(table.to(strategy.root_device)).cpu()
