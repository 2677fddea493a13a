"""Native-resolution packing benchmark: packed rows against padded batches on a mix of web-like image
sizes, as padding arithmetic (thousands of images) and as training steps of the real model (forward,
loss, backward, clip, AdamW) timed in alternation with fixed-size training at the same number of real
tokens per step. Writes benchmarks/results/native_packing.{json,md}.

    .venv/bin/python benchmarks/native_packing.py                  # CPU: size tiny, fp32, budget x 1/4
    .venv/bin/python benchmarks/native_packing.py --device cuda --size large --dtype bf16 --time-scale 1

Image mix (seeded): the geometric-mean side sqrt(w h) log-uniform in [128, 1024] px and the aspect
ratio w/h log-uniform in [1/4, 4], from thumbnails to 1-megapixel photos with portrait and panorama
extremes; each image gets its `native_grid` under the native config's patch budget (data.native:
min_patches 112, max_patches 1024, rows of 2048 tokens, 8 rows a batch, packed over windows of 256).

Variants of the timed step: packed (`pack_batches` rows through `forward_packed`), padded (the same
images, each alone in a row padded to the longest of its batch: the same code path, `pack_layout` with
one image per row) and fixed (square images through the regular `forward` + `aimv2_loss` of a
non-native model, the batch chosen so that real tokens per step match). On CUDA the packed rows run
with both attention backends: FlexAttention block masks ("flex") and the dense masked SDPA ("sdpa",
the CPU path). `--time-scale s` trains on every image scaled by s (budget and rows by s^2): at 1/2
the tiny model's attention is about the share of an encoder layer's FLOPs it is for L at the full
budget (30% against 25%).

Memory: on CUDA, torch.cuda.max_memory_allocated during one step over what was allocated before it
(activations + gradients); on the CPU, each variant in a fresh process: its peak RSS (VmHWM, reset
once everything is built) over the RSS at that point (gradients, AdamW moments and activations; the
first two are the same for every variant). Beside it, the dense attention masks' size from the shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import random
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimv2.data.native import native_grid, pack_batches  # noqa: E402
from aimv2.engine.optim import build_optimizer  # noqa: E402
from aimv2.models import AIMv2, get_size  # noqa: E402
from aimv2.models.native import pack_layout, pack_patches  # noqa: E402
from aimv2.objective import packed_aimv2_loss  # noqa: E402
from aimv2.processes import tune_cpu_allocator  # noqa: E402
from common import alternate, machine, machine_line, median, publish, sync, table  # noqa: E402
from growth import rss_gib  # noqa: E402
from train_step import DTYPES, project_step, synthetic_batch  # noqa: E402


def sample_sizes(n: int, seed: int, px: tuple[int, int], max_aspect: float) -> list[tuple[int, int]]:
    """(width, height) of n images (module docstring)."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        side = math.exp(rng.uniform(math.log(px[0]), math.log(px[1])))
        aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
        sizes.append((max(1, round(side * math.sqrt(aspect))), max(1, round(side / math.sqrt(aspect)))))
    return sizes


def patch_counts(sizes, scale: float, patch: int, lo: int, hi: int) -> list[tuple[int, int]]:
    return [native_grid(max(1, round(w * scale)), max(1, round(h * scale)), patch, lo, hi) for w, h in sizes]


def windows(lengths: list[int], window: int, row_tokens: int, rows: int):
    """pack_batches over consecutive windows of `window` images; batches of global indices."""
    for start in range(0, len(lengths), window):
        for batch in pack_batches(lengths[start : start + window], row_tokens, rows):
            yield [[start + i for i in row] for row in batch]


def padding_figures(lengths: list[int], args) -> dict:
    """Part 1: padding fractions, pure arithmetic over the whole mix."""
    real, out = sum(lengths), {}
    for mult in args.row_multiples:
        row_tokens = mult * args.max_patches
        batches = list(windows(lengths, args.window, row_tokens, args.rows))
        slots = sum(len(b) for b in batches) * row_tokens
        out[f"packed, rows of {row_tokens} ({mult}x max_patches)"] = {
            "padding": 1 - real / slots,
            "images_per_row": len(lengths) / sum(len(b) for b in batches),
        }
    for b in args.pad_batches:
        slots = sum(len(lengths[k : k + b]) * max(lengths[k : k + b]) for k in range(0, len(lengths), b))
        out[f"padded to the longest of {b} images"] = {"padding": 1 - real / slots, "images_per_row": 1.0}
    out["padded to max_patches"] = {"padding": 1 - real / (len(lengths) * args.max_patches), "images_per_row": 1.0}
    return out


def build(args, device: str) -> dict:
    """Part 2's models, batches and step functions (the same in the timing run and in each memory run)."""
    spec, dtype, s = get_size(args.size), DTYPES[args.dtype], args.time_scale
    p, lo, hi = spec.patch_size, round(args.min_patches * s * s), round(args.max_patches * s * s)
    row_tokens = round(args.row_tokens * s * s)
    grids = patch_counts(sample_sizes(args.window * 4, args.seed, args.px, args.max_aspect), s, p, lo, hi)
    lengths = [gh * gw for gh, gw in grids]
    full = [b for b in windows(lengths, args.window, row_tokens, args.rows) if len(b) == args.rows]
    # pack_batches puts the fullest rows first: take the middle batch of each of `batches` equal strata
    full = [full[(2 * k + 1) * len(full) // (2 * args.batches)] for k in range(min(args.batches, len(full)))]
    g = torch.Generator().manual_seed(args.seed)
    batches, scores, slots, needed = [], {"packed": 0, "padded": 0}, {"packed": 0, "padded": 0}, 0.0
    for rows in full:
        ids = sorted(i for row in rows for i in row)
        local = {i: k for k, i in enumerate(ids)}
        gb = [grids[i] for i in ids]
        counts = torch.tensor([gh * gw for gh, gw in gb])
        text = torch.randint(8, 33, (len(ids),), generator=g)  # alt-text lengths, as train_step's batch
        tokens = torch.randint(1, args.vocab, (len(ids), args.text_len), generator=g)
        tokens = tokens.masked_fill(torch.arange(args.text_len)[None] >= text[:, None], 0)
        prefix = (torch.rand(len(ids), generator=g) * (counts - 1)).long() + 1  # uniform in [1, N_i - 1]
        pixels = [torch.randn(int(c), p * p * 3, generator=g) for c in counts]
        needed += float((counts**2 + (counts + text) ** 2).sum())  # each image's own blocks only
        batch = {
            "tokens": tokens.to(device),
            "prefix": prefix.to(device),
            "real": int(counts.sum()),
            "images": len(ids),
        }
        for name, layout_rows, t_len in (
            ("packed", [[local[i] for i in row] for row in rows], row_tokens),
            ("padded", [[k] for k in range(len(ids))], int(counts.max())),
        ):
            layout = pack_layout(gb, text.tolist(), layout_rows, t_len, args.text_len)
            batch[name] = ({k: v.to(device) for k, v in layout.items()}, pack_patches(pixels, layout).to(device))
            r, t = layout["patch_image"].shape
            scores[name] += r * (t * t + layout["dec_source"].shape[1] ** 2)  # one encoder + one decoder layer
            slots[name] += r * t
        batches.append(batch)
    if not batches:
        raise SystemExit(f"no full batch of {args.rows} rows in a window of {args.window} images: lower --rows")
    real = sum(b["real"] for b in batches) / len(batches)
    fixed_px = args.fixed_px or math.isqrt(hi) * p
    fixed_tokens = (fixed_px // p) ** 2
    fixed_batch = max(1, round(real / fixed_tokens))

    def autocast():
        return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.split(":")[0], dtype=dtype)

    torch.manual_seed(0)
    native = AIMv2(spec, fixed_px, args.vocab, args.text_len, native=True).to(device)
    fixed = AIMv2(spec, fixed_px, args.vocab, args.text_len).to(device)
    opts = {m: build_optimizer(m, 1e-4, 1e-4, (0.9, 0.95), 1e-8) for m in (native, fixed)}

    def packed_step(key: str, backend: str):
        cycle = itertools.cycle(batches)

        def step() -> None:
            b = next(cycle)
            layout, patches = b[key]
            with autocast():
                pixels, logits = native.forward_packed(patches, b["tokens"], layout, b["prefix"], backend)
                loss = packed_aimv2_loss(pixels, logits, patches, b["tokens"], layout, b["prefix"]).total
            loss.backward()
            torch.nn.utils.clip_grad_norm_(native.parameters(), 1.0)
            opts[native].step()
            opts[native].zero_grad(set_to_none=True)

        return step

    def variant(step, key: str | None, dense: bool = True) -> dict:
        """Per step: real encoder tokens, padding, the dense fp32 mask biases (MiB), and the attention
        scores of one encoder + one decoder layer per real token (each image's own blocks for flex)."""
        n = len(batches)
        if key is None:  # fixed: the encoder's prefix bias; the decoder runs is_causal (no mask)
            return {
                "step": step,
                "real": fixed_batch * fixed_tokens,
                "padding": 0.0,
                "mask_mib": 4 * fixed_batch * fixed_tokens**2 / 2**20,
                "scores": (fixed_tokens**2 + (fixed_tokens + args.text_len) ** 2) / fixed_tokens,
            }
        return {
            "step": step,
            "real": real,
            "padding": 1 - real * n / slots[key],
            "mask_mib": 4 * scores[key] / n / 2**20 if dense else 0.0,
            "scores": (scores[key] if dense else needed) / n / real,
        }

    variants = {"packed, dense SDPA": variant(packed_step("packed", "sdpa"), "packed")}
    if device.startswith("cuda"):
        variants["packed, FlexAttention"] = variant(packed_step("packed", "flex"), "packed", dense=False)
    variants["padded, dense SDPA"] = variant(packed_step("padded", "sdpa"), "padded")
    fixed_data = synthetic_batch(fixed_batch, fixed_px, args.vocab, args.text_len, device, seed=args.seed)
    variants[f"fixed {fixed_px} px, batch {fixed_batch}"] = variant(
        project_step(fixed, opts[fixed], fixed_data, autocast), None
    )
    return {"variants": variants, "batches": batches, "budget": (lo, hi, row_tokens)}


def reset_peak_rss() -> bool:
    """Linux: restart the process's peak RSS (VmHWM) from its current RSS, so that building does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib(reset: bool) -> float:
    if reset:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the whole process's: an upper bound


def peak_memory(argv: list[str], name: str, fn, device: str) -> float:
    """GiB over the built state during a step (module docstring); the CPU asks a fresh process."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**30
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {name!r} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_gib"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--samples", type=int, default=20000, help="images of the padding arithmetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--px", type=int, nargs=2, default=[128, 1024], help="range of sqrt(w h), log-uniform")
    parser.add_argument("--max-aspect", type=float, default=4.0, help="aspect ratios from 1:A to A:1, log-uniform")
    parser.add_argument("--min-patches", type=int, default=112)
    parser.add_argument("--max-patches", type=int, default=1024)
    parser.add_argument("--row-tokens", type=int, default=1024, help="the config default (data.native.row_tokens)")
    parser.add_argument("--rows", type=int, default=16, help="rows per packed batch (data.native.rows)")
    parser.add_argument("--window", type=int, default=256, help="images packed together")
    parser.add_argument("--row-multiples", type=int, nargs="+", default=[1, 2, 4], help="row_tokens / max_patches")
    parser.add_argument(
        "--pad-batches", type=int, nargs="+", default=[8, 32], help="batch sizes padded to their longest"
    )
    parser.add_argument(
        "--time-scale", type=float, default=0.5, help="timed images scaled by this (budget by its square)"
    )
    parser.add_argument("--fixed-px", type=int, default=0, help="fixed-size side (0: the one with max_patches tokens)")
    parser.add_argument("--batches", type=int, default=3, help="distinct packed batches, each run once per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=49408)
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--name", default="native_packing")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one variant's memory, fresh process
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    device = args.device
    if device == "cpu":
        tune_cpu_allocator()
    if args.memory_of:
        fn = build(args, device)["variants"][args.memory_of]["step"]
        base = rss_gib()
        reset = reset_peak_rss()
        for _ in range(3):  # the first allocates the AdamW moments
            fn()
        print(json.dumps({"peak_gib": peak_rss_gib(reset) - base}))
        return {}

    spec = get_size(args.size)
    sizes = sample_sizes(args.samples, args.seed, args.px, args.max_aspect)
    lengths = [gh * gw for gh, gw in patch_counts(sizes, 1.0, spec.patch_size, args.min_patches, args.max_patches)]
    padding = padding_figures(lengths, args)

    built = build(args, device)
    variants, batches = built["variants"], built["batches"]
    times = alternate({k: v["step"] for k, v in variants.items()}, args.rounds, len(batches), device)
    memory = {k: peak_memory(argv, k, v["step"], device) for k, v in variants.items()}
    rate = {k: variants[k]["real"] / median(ts) for k, ts in times.items()}
    fixed = next(k for k in variants if k.startswith("fixed"))
    dense, flex = rate["packed, dense SDPA"], rate.get("packed, FlexAttention")
    ratios = {"packed / fixed": dense / rate[fixed], "packed / padded": dense / rate["padded, dense SDPA"]}
    if flex:
        ratios |= {"packed flex / fixed": flex / rate[fixed], "packed flex / packed dense": flex / dense}
    lo, hi, row_tokens = built["budget"]
    images = sum(b["images"] for b in batches) / len(batches)
    info = machine(device)
    command = shlex.join(["benchmarks/native_packing.py", *argv])
    figures = {
        k: {
            "real_tokens_per_step": v["real"],
            "padding": round(v["padding"], 4),
            "step_s": round(median(times[k]), 4),
            "step_s_rounds": [round(t, 4) for t in times[k]],
            "real_tokens_per_s": round(rate[k], 1),
            "peak_gib": round(memory[k], 3),
            "dense_mask_mib": round(v["mask_mib"], 1),
            "scores_per_real_token": round(v["scores"], 1),
        }
        for k, v in variants.items()
    }
    result = {
        **info,
        "command": command,
        "size": args.size,
        "dtype": args.dtype,
        "seed": args.seed,
        "px": args.px,
        "max_aspect": args.max_aspect,
        "samples": args.samples,
        "budget": {
            "min_patches": args.min_patches,
            "max_patches": args.max_patches,
            "row_tokens": args.row_tokens,
            "rows": args.rows,
            "window": args.window,
        },
        "mean_patches": round(sum(lengths) / len(lengths), 1),
        "share_near_max": round(sum(n > 0.95 * args.max_patches for n in lengths) / len(lengths), 4),
        "padding": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in padding.items()},
        "timed": {
            "time_scale": args.time_scale,
            "min_patches": lo,
            "max_patches": hi,
            "row_tokens": row_tokens,
            "images_per_step": round(images, 2),
            "rounds": args.rounds,
            "batches": len(batches),
        },
        "variants": figures,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }
    memory_kind = (
        "torch.cuda.max_memory_allocated during one step over what was allocated before it (activations + gradients)"
        if device.startswith("cuda")
        else "peak RSS of a fresh process over its built state "
        "(gradients + AdamW moments + activations; the first two are the same for every variant)"
    )
    md = [
        f"# Native resolution: packed against padded batches ({info['date']})",
        "",
        f"Machine: {machine_line(info)}. Command: `.venv/bin/python {command}`.",
        "",
        f"Image mix ({args.samples} images, seed {args.seed}): sqrt(w h) log-uniform in [{args.px[0]}, "
        f"{args.px[1]}] px and aspect log-uniform in [1:{args.max_aspect:g}, {args.max_aspect:g}:1], thumbnails to "
        f"1-megapixel photos with portraits and panoramas, as in a web image-text set (the uniform log-aspect "
        f"over-weights the extremes, the harder case for packing). Grids from `native_grid` under min/max patches "
        f"{args.min_patches}/{args.max_patches}: {result['mean_patches']:.0f} patches per image on average, "
        f"{result['share_near_max']:.0%} within 5% of max_patches.",
        "",
        f"## Padding (arithmetic over all {args.samples} images; goal: packed under 5%)",
        "",
        f"Packed: `pack_batches` over windows of {args.window} images, {args.rows} rows per batch (a window's last "
        "batch may be short). Padded: each image alone in a row, in the mix's order.",
        "",
    ]
    md += table(
        ["batches", "padding", "images per row"],
        [[k, f"{v['padding']:.1%}", f"{v['images_per_row']:.2f}"] for k, v in padding.items()],
    )
    md += [
        "",
        "## Training step: real encoder tokens per second (goal: packed / fixed >= 0.95)",
        "",
        f"Size `{args.size}`, {args.dtype}; a step = forward + AIMv2 loss + backward + clip + AdamW; vocabulary "
        f"{args.vocab}, captions of 8-32 tokens padded to {args.text_len}. The same mix with every image scaled by "
        f"{args.time_scale:g} (budget {lo}/{hi} patches, {args.rows} rows of {row_tokens}: {images:.1f} images per "
        f"step); the padded step holds the packed step's images, the fixed step as many real tokens. Medians of "
        f"{args.rounds} alternating rounds, each running {len(batches)} distinct batches (spread over a window's "
        f"fullest to emptiest) per variant. Memory: {memory_kind}. Masks: the dense fp32 biases a step builds "
        f"(encoder + decoder). Scores: attention score entries of one encoder and one decoder layer per real token "
        f"(dense rows: the full T x T; FlexAttention: each image's own, a lower bound at 128 x 128 blocks; the "
        f"fixed decoder's include its padded captions).",
        "",
    ]
    md += table(
        [
            "variant",
            "real tokens / step",
            "padding",
            "step (s)",
            "real tokens / s",
            "peak memory (GiB)",
            "dense masks (MiB)",
            "scores / real token",
        ],
        [
            [
                k,
                f"{f['real_tokens_per_step']:.0f}",
                f"{f['padding']:.1%}",
                f"{f['step_s']:.3f}",
                f"{f['real_tokens_per_s']:.0f}",
                f"{f['peak_gib']:.3f}",
                f"{f['dense_mask_mib']:.1f}",
                f"{f['scores_per_real_token']:.0f}",
            ]
            for k, f in figures.items()
        ],
    )
    md += [
        "",
        "Ratios of real tokens per second (packed: dense SDPA rows): "
        + ", ".join(f"{k} **{v:.3f}**" for k, v in ratios.items())
        + ".",
    ]
    if device == "cpu":
        md += [
            "",
            "Figures from a shared 2-core CPU are indicative: alternation evens out load drift, not contention. "
            "On the CPU packed rows run the dense masked SDPA, which computes every row's full T x T scores, "
            "cross-image blocks included; FlexAttention (`--device cuda`) skips the blocks outside every image.",
        ]
    publish(args.name, result, md)
    return result


if __name__ == "__main__":
    main()
