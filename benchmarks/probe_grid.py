"""Probe measurements (figures, not tests): the cost of the one-pass grid of 14 heads relative to a
single head on the same frozen forward (target: at most 1.3x), and cached-mode head-training
throughput. Writes benchmarks/results/probe.json and probe.md.

    .venv/bin/python benchmarks/probe_grid.py [--size small] [--img-size 224] [--batch 32]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimv2.models.encoder import build_encoder  # noqa: E402
from aimv2.models.sizes import get_size  # noqa: E402
from aimv2.probe.config import PAPER_LRS, PAPER_WDS, ProbeOptimConfig  # noqa: E402
from aimv2.probe.features import encode  # noqa: E402
from aimv2.probe.head_grid import HeadGrid, grid_specs  # noqa: E402
from aimv2.probe.heads import encoder_attention_heads  # noqa: E402
from aimv2.processes import tune_cpu_allocator  # noqa: E402
from common import alternate, machine, machine_line, median, publish, table  # noqa: E402


def _grid(kind: str, n_lrs: int, n_wds: int, dim: int, classes: int, heads: int) -> HeadGrid:
    cfg = ProbeOptimConfig()
    return HeadGrid(grid_specs([kind], PAPER_LRS[:n_lrs], PAPER_WDS[:n_wds]), dim, classes, cfg, heads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # as the `aimv2` command does for every verb
    torch.manual_seed(0)
    encoder = build_encoder(get_size(args.size), args.img_size).eval().requires_grad_(False)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, args.classes, (args.batch,))
    feats = encode(encoder, images, [])  # (B, N, D)
    dim = feats.shape[-1]

    def step(grid: HeadGrid, with_encoder: bool, x=feats, y=labels) -> None:
        tokens = encode(encoder, images, []) if with_encoder else x
        grid.loss(grid(tokens), y).backward()
        grid.optimizer_step(1000, 10)

    figures: dict = {}
    for kind in ("attentive", "linear"):
        heads = encoder_attention_heads(encoder)  # the probe's default: the trunk's own (6 for small)
        one, grid14 = _grid(kind, 1, 1, dim, args.classes, heads), _grid(kind, 7, 2, dim, args.classes, heads)
        cached_x = feats if kind == "attentive" else feats.mean(1)
        big_x = cached_x.repeat(8, *([1] * (cached_x.dim() - 1)))  # a batch of 8 x args.batch cached rows
        big_y = labels.repeat(8)
        times = alternate(
            {
                "1": functools.partial(step, one, True),
                "14": functools.partial(step, grid14, True),
                "encoder": functools.partial(encode, encoder, images, []),
                "cached": functools.partial(step, grid14, False, big_x, big_y),
            },
            args.repeats,
            1,
            warmup=1,
        )
        t1, t14, t_enc, tc = (median(times[k]) for k in ("1", "14", "encoder", "cached"))
        figures[kind] = {
            "encoder_forward_s": round(t_enc, 4),
            "step_1_head_s": round(t1, 4),
            "step_14_heads_s": round(t14, 4),
            "grid_cost_ratio_14_vs_1": round(t14 / t1, 3),
            "cached_14_heads_samples_per_s": round(len(big_y) / tc, 1),
            "cached_batch": len(big_y),
        }
    info = machine("cpu")
    result = {
        **info,
        "encoder": f"{args.size} @ {args.img_size} px ({feats.shape[1]} tokens x {dim})",
        "batch": args.batch,
        "classes": args.classes,
        "heads": figures,
    }
    md = [
        f"# Probe grid benchmark ({info['date']})",
        "",
        f"Machine: {machine_line(info)}; encoder {result['encoder']}; batch {args.batch}; {args.classes} classes. "
        "One step = frozen forward + heads forward/backward + AdamW.",
        "",
    ]
    md += table(
        [
            "heads",
            "encoder forward (s)",
            "step, 1 head (s)",
            "step, 14 heads (s)",
            "14 vs 1",
            "cached: 14 heads, samples/s",
        ],
        [
            [
                kind,
                f["encoder_forward_s"],
                f["step_1_head_s"],
                f["step_14_heads_s"],
                f"{f['grid_cost_ratio_14_vs_1']}x",
                f["cached_14_heads_samples_per_s"],
            ]
            for kind, f in figures.items()
        ],
    )
    publish("probe", result, md)


if __name__ == "__main__":
    main()
