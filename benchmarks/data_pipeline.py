"""Data-pipeline benchmark: samples/s of one worker streaming the project's own shards (tar reading,
shuffle, JPEG decode, RandomResizedCrop, flip, tensor + normalize, tokenize, collate) against the raw
limit on the same JPEGs in the same process: decode and RandomResizedCrop in a tight loop. Measured
in alternation. Writes benchmarks/results/data_pipeline.{json,md}.

    .venv/bin/python benchmarks/data_pipeline.py [--samples 512] [--img-size 224]

The images are synthetic but photo-like in size and entropy (500 x 375, JPEG quality 90, smooth
shapes plus sensor-like noise, about ImageNet's average file), written by `aimv2.data.shards`.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimv2.config import DataConfig, SourceConfig, TokenizerConfig  # noqa: E402
from aimv2.data.samples import pretrain_transform  # noqa: E402
from aimv2.data.shards import ShardSample, write_shards  # noqa: E402
from aimv2.pretraining.pretrain import PretrainDataModule  # noqa: E402
from aimv2.processes import tune_cpu_allocator  # noqa: E402
from common import alternate, machine, machine_line, median, publish, table  # noqa: E402

RAW, RAW_PIL = "raw limit: decode + crop", "PIL decode + PIL crop"
WORDS = "a photo of the small red large blue dog cat car on in with near street field river house".split()


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    coarse = rng.random((height // 25 + 1, width // 25 + 1, 3)) * 255
    img = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_bench_shards(out: Path, n: int, per_shard: int = 128) -> tuple[str, list[bytes]]:
    rng = np.random.default_rng(0)
    jpegs = [photo_like(rng) for _ in range(n)]

    def samples():
        for i, data in enumerate(jpegs):
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 20))))
            yield ShardSample(key=f"{i:09d}", image=data, image_ext="jpg", caption=caption)

    report = write_shards(samples(), out, samples_per_shard=per_shard, verify_images=False, progress=False)
    return report.urls, jpegs


def stage_costs(stream, jpegs: list[bytes], crop, batch: int) -> dict[str, float]:
    """Milliseconds per sample of each pipeline stage run alone (best of 3): the profile of the gap."""
    import webdataset as wds

    from aimv2.data.samples import decode_caption

    urls = [shard.url for source in stream.sources for shard in source.shards]
    raw_samples = [s for url in urls for s in wds.tarfile_to_samples()([{"url": url}])]
    tensors = [decode_image(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB) for d in jpegs]
    crops = [crop(t) for t in tensors]
    captions = [decode_caption(s) for s in raw_samples]
    tokenizer = stream.collate.tokenizer
    stages = {
        "tar reading (webdataset)": lambda: [s for url in urls for s in wds.tarfile_to_samples()([{"url": url}])],
        "decode": lambda: [
            decode_image(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB) for d in jpegs
        ],
        "crop": lambda: [crop(t) for t in tensors],
        "flip": lambda: [c.flip(-1) for c in crops],
        "tokenize (CLIP BPE)": lambda: [tokenizer(captions[i : i + batch]) for i in range(0, len(captions), batch)],
        "collate (stack uint8)": lambda: [torch.stack(crops[i : i + batch]) for i in range(0, len(crops), batch)],
    }
    costs = {}
    for name, fn in stages.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        costs[name] = round(1e3 * best / len(jpegs), 4)
    return costs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="data_pipeline")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a data worker: one thread, as DataLoader workers run
    tune_cpu_allocator()  # as ShardStream does in every DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        urls, jpegs = write_bench_shards(Path(tmp), args.samples)
        cfg = DataConfig(
            sources=[SourceConfig(urls=urls)],
            batch_size=args.batch,
            num_workers=0,
            mode="epoch",
            shuffle_buffer=1000,
            tokenizer=TokenizerConfig(),
        )
        data = PretrainDataModule(cfg, args.img_size)
        stream = data.build_stream()
        crop = pretrain_transform(args.img_size).crop  # the pipeline's RandomResizedCrop (bicubic), no flip
        pil_crop = T.RandomResizedCrop(args.img_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC)
        n_batches = args.samples // args.batch
        jpegs = jpegs[: n_batches * args.batch]

        def pipeline() -> None:
            count = sum(1 for _ in zip(range(n_batches), iter(stream)))
            assert count == n_batches, f"the stream gave {count} of {n_batches} batches"

        def raw() -> None:  # the limit: the pipeline's own decode and crop, nothing else
            for data in jpegs:
                crop(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))

        def raw_pil() -> None:  # the classic path, for reference: PIL decode + PIL bicubic crop
            for data in jpegs:
                with Image.open(io.BytesIO(data)) as img:
                    pil_crop(img.convert("RGB"))

        times = alternate({"pipeline": pipeline, RAW: raw, RAW_PIL: raw_pil}, args.rounds, 1, warmup=1)
        breakdown = stage_costs(stream, jpegs, crop, args.batch)
    samples = n_batches * args.batch
    rates = {name: samples / median(ts) for name, ts in times.items()}
    ratio = rates["pipeline"] / rates[RAW]
    info = machine("cpu")
    mean_kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    result = {
        **info,
        "samples": samples,
        "img_size": args.img_size,
        "batch": args.batch,
        "mean_jpeg_kb": round(mean_kb, 1),
        "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
        "pipeline_vs_raw": round(ratio, 3),
        "seconds_per_round": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    md = [
        f"# Data pipeline, one worker ({info['date']})",
        "",
        f"Machine: {machine_line(info)}; one thread (a DataLoader worker). {samples} synthetic photo-like JPEGs "
        f"(500 x 375, mean {mean_kb:.0f} KB) in shards written by aimv2.data.shards; crop {args.img_size} px, "
        f"batch {args.batch}. Medians of {args.rounds} alternating rounds.",
        "",
    ]
    md += table(
        ["path", "samples/s", "vs raw limit"],
        [[name, f"{rate:.1f}", f"{rate / rates[RAW]:.1%}"] for name, rate in rates.items()],
    )
    md += [
        "",
        "pipeline = tar reading, shuffle buffer, decode into a uint8 tensor (torchvision, libjpeg-turbo), "
        "RandomResizedCrop(0.4-1, antialiased bicubic on uint8), flip, CLIP BPE tokenize, collate (uint8; "
        "normalization happens on the training device); raw limit = the same decode and crop only; "
        "PIL = decode and RandomResizedCrop through PIL, the usual torchvision recipe.",
    ]
    gap_ms = 1e3 / rates["pipeline"] - 1e3 / rates[RAW]
    result["stage_ms_per_sample"] = breakdown
    result["gap_ms_per_sample"] = round(gap_ms, 4)
    md += [
        "",
        f"Where the pipeline's extra {gap_ms:.3f} ms per sample goes: each stage alone, same run, "
        "best of 3 (ms per sample):",
        "",
    ]
    md += table(
        ["stage", "ms/sample", "in the raw limit"],
        [[name, f"{ms:.3f}", "yes" if name in ("decode", "crop") else "no"] for name, ms in breakdown.items()],
    )
    publish(args.name, result, md)
    return result


if __name__ == "__main__":
    main()
