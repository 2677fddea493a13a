"""Image-caption batches for alignment, through the pre-training pipeline (shard lists, the
`ShardStream`, sample decoding, caption tokenizer), with the encoder's eval preprocessing
(resize + center crop, no augmentation, as in LLaVA's alignment stage).

Training streams shards in resampled mode (infinite; `trainer.max_steps` ends the run) and resumes
exactly at the batch a checkpoint was taken after, as pre-training does. Held-out
evaluation reads every sample exactly once, in order, including the last partial batch, through the
evaluation reader probes use too (aimv2.data.every_sample).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from aimv2.compress.config import CompressDataSection
from aimv2.data.every_sample import every_sample_loader
from aimv2.data.shardlist import check_first_shard, resolve_shards
from aimv2.data.stream import ShardStream, StreamSource
from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.engine.stream_data import StreamDataModule
from aimv2.errors import UserError
from aimv2.data.transforms import eval_transform
from aimv2.data.image_caption import ImageCaptionCollator, ImageCaptionProcessor


def processor(preprocessing) -> ImageCaptionProcessor:
    return ImageCaptionProcessor(eval_transform(preprocessing.img_size, preprocessing.mean, preprocessing.std))


class AlignmentDataModule(StreamDataModule):
    """The training stream, resampled; it continues exactly after a resume, as pre-training's does
    (aimv2.engine.stream_data)."""

    def __init__(self, cfg: CompressDataSection, tokenizer: CaptionTokenizer, preprocessing):
        super().__init__(cfg.num_workers)
        self.cfg, self.tokenizer, self.preprocessing = cfg, tokenizer, preprocessing
        check_first_shard(cfg.train, "data.train")  # a mistyped directory fails before any model is built

    def resolve_sources(self) -> list[StreamSource]:
        return [StreamSource("train", resolve_shards(self.cfg.train, "data.train", need_counts=False))]

    def build_stream(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        cfg = self.cfg
        return ShardStream(self.resolved_sources(), process=processor(self.preprocessing),
                           collate=ImageCaptionCollator(self.tokenizer), batch_size=cfg.batch_size,
                           mode="resampled", rank=rank, world_size=world_size, num_workers=cfg.num_workers,
                           seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)


def held_out_loader(spec: str, key: str, tokenizer: CaptionTokenizer, preprocessing, batch_size: int,
                    num_workers: int) -> DataLoader:
    """Every held-out sample once, in order (aimv2.data.every_sample), with the eval preprocessing."""
    if not spec:
        raise UserError(f"{key}: no held-out shards given (e.g. {key}='/data/cc_val/{{00000..00003}}.tar')")
    shards = resolve_shards(spec, key, need_counts=False)
    return every_sample_loader(shards, processor(preprocessing), ImageCaptionCollator(tokenizer), batch_size, num_workers)
