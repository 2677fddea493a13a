"""Image-caption batches for alignment, through the pre-training pipeline (shard lists, the
`ShardStream`, sample decoding, caption tokenizer), with the encoder's eval preprocessing
(resize + center crop, no augmentation, as in LLaVA's alignment stage).

Training streams shards in resampled mode (infinite; `trainer.max_steps` ends the run). Held-out
evaluation reads every sample exactly once, in order, including the last partial batch.
"""

from __future__ import annotations

from typing import Callable, Iterator

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from aimv2.compress.config import CompressDataSection
from aimv2.data.samples import CorruptSample
from aimv2.data.shardlist import resolve_shards
from aimv2.data.stream import EpochAwareLoader, ShardStream, StreamSource
from aimv2.data.tokenizer import CaptionTokenizer
from aimv2.errors import UserError
from aimv2.data.transforms import eval_transform
from aimv2.data.image_caption import ImageCaptionCollator, ImageCaptionProcessor


def processor(preprocessing) -> ImageCaptionProcessor:
    return ImageCaptionProcessor(eval_transform(preprocessing.img_size, preprocessing.mean, preprocessing.std))


class AlignmentDataModule(L.LightningDataModule):
    def __init__(self, cfg: CompressDataSection, tokenizer: CaptionTokenizer, preprocessing):
        super().__init__()
        self.cfg, self.tokenizer, self.preprocessing = cfg, tokenizer, preprocessing
        self.source = StreamSource("train", resolve_shards(cfg.train, "data.train", need_counts=False))
        self.stream: ShardStream | None = None

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        cfg = self.cfg
        self.stream = ShardStream([self.source], process=processor(self.preprocessing),
                                  collate=ImageCaptionCollator(self.tokenizer), batch_size=cfg.batch_size,
                                  mode="resampled", rank=rank, world_size=world, num_workers=cfg.num_workers,
                                  seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)

    def train_dataloader(self) -> EpochAwareLoader:
        return EpochAwareLoader(self.stream, num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available())


class HeldOutBatches(IterableDataset):
    """Every sample of the shards once, in shard order; workers take every k-th shard. Each batch
    carries how many corrupt samples were skipped while it was assembled."""

    def __init__(self, urls: list[str], process: Callable, collate: Callable, batch_size: int):
        super().__init__()
        self.urls, self.process, self.collate, self.batch_size = urls, process, collate, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        items, skipped = [], 0
        for sample in wds.tarfile_to_samples()({"url": u} for u in self.urls[worker::workers]):
            try:
                items.append(self.process(sample))
            except CorruptSample:
                skipped += 1
                continue
            if len(items) == self.batch_size:
                yield self._batch(items, skipped)
                items, skipped = [], 0
        if items:
            yield self._batch(items, skipped)

    def _batch(self, items: list, skipped: int) -> dict:
        batch = self.collate(items)
        batch["skipped"] = torch.tensor(skipped)
        return batch


def held_out_loader(spec: str, key: str, tokenizer: CaptionTokenizer, preprocessing, batch_size: int,
                    num_workers: int) -> DataLoader:
    if not spec:
        raise UserError(f"{key}: no held-out shards given (e.g. {key}='/data/cc_val/{{00000..00003}}.tar')")
    urls = [s.url for s in resolve_shards(spec, key, need_counts=False)]
    dataset = HeldOutBatches(urls, processor(preprocessing), ImageCaptionCollator(tokenizer), batch_size)
    return DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(urls)))
