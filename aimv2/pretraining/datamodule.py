"""The pre-training LightningDataModule: image-caption batches streamed from shard sources, resumable
at any batch (aimv2.engine.stream_data)."""

from __future__ import annotations

from aimv2.config import DataConfig
from aimv2.data.image_caption import ImageCaptionCollator, ImageCaptionProcessor
from aimv2.data.samples import decode_image_tensor
from aimv2.data.shardlist import check_first_shard, resolve_shards
from aimv2.data.stream import ShardStream, StreamSource
from aimv2.data.tokenizer import build_tokenizer
from aimv2.data.native import NativeImageCaptionProcessor, NativeResizeFlip, PackedCollator, Packing
from aimv2.data.transforms import normalize_images, normalize_patch_pixels, pretrain_transform
from aimv2.engine.stream_data import StreamDataModule
from aimv2.errors import UserError


class PretrainDataModule(StreamDataModule):
    """Exact resume of the stream comes from `StreamDataModule` (aimv2.engine.stream_data)."""

    def __init__(self, cfg: DataConfig, img_size: int, native_patch: int | None = None):
        """`native_patch`: the patch size of a native-resolution model (model.native): batches are then
        packed rows of images at their own aspect ratio (cfg.native), not crops of img_size."""
        super().__init__(cfg.num_workers, cfg.on_change)
        self.cfg, self.img_size, self.native_patch = cfg, img_size, native_patch
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        # A mistyped shard directory is reported now, before any model is built (one file operation per
        # source); the sources are resolved once the processes exist, by one of them (setup).
        for i, src in enumerate(cfg.sources):
            check_first_shard(src.urls, f"data.sources.{i}.urls")

    def resolve_sources(self) -> list[StreamSource]:
        cfg = self.cfg
        return [StreamSource(src.name or f"source{i}",
                             resolve_shards(src.urls, f"data.sources.{i}.urls", need_counts=cfg.mode == "epoch"),
                             src.weight)
                for i, src in enumerate(cfg.sources)]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def build_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        cfg = self.cfg
        if self.native_patch is not None:
            n = cfg.native
            packing = Packing(self.native_patch, n.min_patches, n.max_patches, n.row_tokens, n.rows, n.window,
                              tuple(cfg.crop_scale), tuple(cfg.crop_ratio))
            process = NativeImageCaptionProcessor(NativeResizeFlip(self.native_patch, cfg.hflip), decode_image_tensor)
            collate = PackedCollator(self.tokenizer, self.native_patch, n.row_tokens)
        else:
            packing = None
            process = ImageCaptionProcessor(pretrain_transform(self.img_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip),
                                            decode=decode_image_tensor)
            collate = ImageCaptionCollator(self.tokenizer)
        try:
            return ShardStream(
                self.resolved_sources(), process=process, collate=collate,
                batch_size=cfg.batch_size, mode=cfg.mode, rank=rank, world_size=world_size,
                num_workers=cfg.num_workers, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer, packing=packing,
            )
        except ValueError as err:
            raise UserError(f"data: {err}") from None

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 images from the workers become normalized floats here, on the training device."""
        if "patches" in batch:  # packed native-resolution rows
            batch["patches"] = normalize_patch_pixels(batch["patches"])
        else:
            batch["image"] = normalize_images(batch["image"])
        return batch
