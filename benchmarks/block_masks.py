"""Host memory and time of building the packed rows' FlexAttention block masks, before and after: torch's
`create_block_mask` evaluating mask_mod over every (row, query, key) triple (the old way, kept below as
the reference) against the per-block summaries of aimv2.models.masks (`packed_encoder_block_mask`,
`packed_decoder_block_mask`), at the shipped native config's shapes (configs/pretrain/aimv2_large_native.yaml).

    .venv/bin/python benchmarks/block_masks.py          # both modes, before and after (~1 min on 2 cores)

Shapes (seeded): image sizes as benchmarks/native_packing.py draws them (sqrt(w h) log-uniform in
[128, 1024] px, aspect log-uniform in [1/4, 4]), each given its `native_grid` at patch 14 between 112 and
4096 patches; decoder rows are each image's patches then a caption of 77 tokens (the longest). Resampled
mode: the middle batch of `pack_batches` over a window of 1024 images, 2 rows of 4096 tokens. Epoch mode:
32 images (data.batch_size) in as many 4096-token rows as they need.

Memory: each build in a fresh process, on the CPU, with its inputs built and one small build done first
(lazy imports and first-call set-up do not count): the peak RSS (VmHWM, restarted from the current
RSS through /proc/self/clear_refs where Linux allows) after the build over that just before it. The old
way's transient and time are linear in rows at a fixed length (mask_mod is vmapped over rows); where the
first shape's figures project it past --max-old-gib or --max-old-seconds, it is measured on the first
rows only and scaled up by rows x length^2, and the table says so. Time: the median wall time of the
build, repeated in the same process (3 times, up to 30 when fast), on one torch thread by default
(--threads): a build is mostly small tensor ops, and on a loaded 2-core machine more threads spin
against each other (a 7 ms build measured 340 ms).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from aimv2.data.native import native_grid, pack_batches  # noqa: E402
from aimv2.fileio import markdown_table  # noqa: E402
from aimv2.models.masks import (  # noqa: E402
    packed_decoder_block_mask,
    packed_encoder_block_mask,
    sample_prefix_lengths_per_image,
)
from aimv2.models.native import pack_layout  # noqa: E402

# the shipped native config (data.native, data.batch_size, AIMv2-L's patch and caption length)
PATCH, MIN_PATCHES, MAX_PATCHES, ROW_TOKENS, TEXT_LEN = 14, 112, 4096, 4096, 77
SHAPES = {
    "resampled (2 rows x 4096)": {"rows": 2, "window": 1024, "seed": 0},
    "epoch (32 images)": {"rows": None, "window": 32, "seed": 0},
}


# -- before: the old implementation, kept as the reference ---------------------------------------------------
def old_encoder_block_mask(patch_image: torch.Tensor, patch_pos: torch.Tensor, prefix_lengths: torch.Tensor | None):
    """The encoder BlockMask as aimv2.models.masks built it before: mask_mod over the whole (R, T, T) grid."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = patch_image.shape
    m = (
        prefix_lengths[patch_image.clamp_min(0)] if prefix_lengths is not None else torch.full_like(patch_image, length)
    )  # full attention: every key counts as prefix

    def mask_mod(b, h, q, k):
        same = (patch_image[b, q] == patch_image[b, k]) & (patch_image[b, q] >= 0)
        visible = (patch_pos[b, k] < m[b, q]) | (patch_pos[b, k] <= patch_pos[b, q])
        return (same & visible) | (q == k)

    return create_block_mask(mask_mod, rows, None, length, length, device=patch_image.device)


def old_decoder_block_mask(dec_image: torch.Tensor):
    """The decoder BlockMask as built before."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = dec_image.shape

    def mask_mod(b, h, q, k):
        return ((dec_image[b, q] == dec_image[b, k]) & (dec_image[b, q] >= 0) & (k <= q)) | (q == k)

    return create_block_mask(mask_mod, rows, None, length, length, device=dec_image.device)


BUILDERS = {
    ("before", "encoder"): lambda lay, pre: old_encoder_block_mask(lay["patch_image"], lay["patch_pos"], pre),
    ("before", "decoder"): lambda lay, pre: old_decoder_block_mask(lay["dec_image"]),
    ("after", "encoder"): lambda lay, pre: packed_encoder_block_mask(lay["patch_image"], lay["patch_pos"], pre),
    ("after", "decoder"): lambda lay, pre: packed_decoder_block_mask(lay["dec_image"]),
}


# -- inputs ----------------------------------------------------------------------------------------------------
def image_patches(n: int, seed: int) -> list[int]:
    """Patch counts of n seeded web-like images (module docstring)."""
    rng = random.Random(seed)
    counts = []
    for _ in range(n):
        side = math.exp(rng.uniform(math.log(128), math.log(1024)))
        aspect = math.exp(rng.uniform(-math.log(4), math.log(4)))
        w, h = max(1, round(side * math.sqrt(aspect))), max(1, round(side / math.sqrt(aspect)))
        gh, gw = native_grid(w, h, PATCH, MIN_PATCHES, MAX_PATCHES)
        counts.append(gh * gw)
    return counts


def shape_layout(spec: dict, rows: int | None = None) -> tuple[dict, torch.Tensor]:
    """The layout of a shape's batch (its first `rows` rows when given) and each image's prefix length."""
    counts = image_patches(spec["window"], spec["seed"])
    batches = pack_batches(counts, ROW_TOKENS, spec["rows"])
    batch = batches[len(batches) // 2][:rows]  # a middle batch: neither the fullest rows nor the leftovers
    images = [i for row in batch for i in row]
    renumber = {i: j for j, i in enumerate(images)}
    layout = pack_layout(
        [(1, counts[i]) for i in images],
        [TEXT_LEN] * len(images),
        [[renumber[i] for i in row] for row in batch],
        ROW_TOKENS,
        TEXT_LEN,
    )
    gen = torch.Generator().manual_seed(spec["seed"])
    return layout, sample_prefix_lengths_per_image(torch.tensor([counts[i] for i in images]), generator=gen)


def shape_facts(spec: dict) -> dict:
    layout, _ = shape_layout(spec)
    rows, t_len = layout["patch_image"].shape
    return {
        "rows": rows,
        "T": t_len,
        "S": layout["dec_image"].shape[1],
        "images": len(layout["image_start"]),
        "real_tokens": int((layout["patch_image"] >= 0).sum()),
    }


# -- one build in a fresh process --------------------------------------------------------------------------------
def _peak_kib() -> int:
    """This process's peak RSS in KiB: VmHWM, which clear_refs resets. Not ru_maxrss: after exec it keeps the
    peak of the process that forked this one (a large parent, such as benchmarks/scale.py, hides every build)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts from the current RSS
        return True
    except OSError:
        return False


def child(job: dict) -> dict:
    """Peak host memory (GiB) and median time (s) of one build (module docstring)."""
    torch.set_num_threads(job.get("threads", 1))
    spec = dict(job["spec"])
    layout, prefix = shape_layout(spec, job.get("rows"))
    build = BUILDERS[job["impl"], job["mask"]]
    small, small_prefix = shape_layout(dict(spec, rows=1, window=4), 1)
    build(small, small_prefix)  # lazy imports and first-call set-up outside the measurement
    reset = _reset_peak()
    before = _peak_kib()
    start = time.perf_counter()
    mask = build(layout, prefix)
    times = [time.perf_counter() - start]
    peak = _peak_kib()
    blocks = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
    del mask
    while len(times) < 3 and sum(times) < 10 or len(times) < 30 and sum(times) < 1:  # more repeats when fast
        start = time.perf_counter()
        build(layout, prefix)
        times.append(time.perf_counter() - start)
    return {
        "peak_gib": (peak - before) / 2**20,
        "seconds": statistics.median(times),
        "reset": reset,
        "blocks": blocks,
        "rows": layout["patch_image"].shape[0],
        "length": layout["patch_image" if job["mask"] == "encoder" else "dec_image"].shape[1],
    }


def run_child(job: dict, timeout: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"build {job} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the measurement -------------------------------------------------------------------------------------------
def measure(
    shapes: dict | None = None,
    max_old_gib: float = 8.0,
    max_old_seconds: float = 60.0,
    threads: int = 1,
    timeout: float = 300.0,
) -> dict:
    """Before/after peak host memory and time of each mask at each shape: {"shapes": {name: {facts,
    "encoder"/"decoder": {"length", "before", "after"}}}, "threads", "markdown": [lines]}. Where the first
    shape's figures project the old way past max_old_gib or max_old_seconds, it runs on fewer rows and is
    scaled up ("scaled_from_rows")."""
    shapes = SHAPES if shapes is None else shapes
    results: dict = {}
    per_cell: dict[str, tuple[float, float]] = {}  # the old way's (GiB, s) per row x length^2, from the first shape
    for name, spec in shapes.items():
        facts = shape_facts(spec)
        entry = results[name] = {**facts}
        for mask in ("encoder", "decoder"):
            length = facts["T"] if mask == "encoder" else facts["S"]
            after = run_child({"spec": spec, "impl": "after", "mask": mask, "threads": threads}, timeout)
            rows = facts["rows"]
            if mask in per_cell:
                gib, seconds = (c * facts["rows"] * length**2 for c in per_cell[mask])
                fits = min(max_old_gib / max(gib, 1e-9), max_old_seconds / max(seconds, 1e-9))
                rows = max(1, min(rows, int(rows * fits)))
            before = run_child(
                {"spec": spec, "impl": "before", "mask": mask, "rows": rows, "threads": threads}, timeout
            )
            if rows < facts["rows"]:  # scaled by rows x length^2 (a subset's decoder rows may be shorter)
                scale = facts["rows"] * length**2 / (rows * before["length"] ** 2)
                before.update(
                    scaled_from_rows=rows, peak_gib=before["peak_gib"] * scale, seconds=before["seconds"] * scale
                )
            per_cell.setdefault(
                mask,
                (
                    before["peak_gib"] / (rows * before["length"] ** 2),
                    before["seconds"] / (rows * before["length"] ** 2),
                ),
            )
            entry[mask] = {"length": length, "before": before, "after": after}
    return {"shapes": results, "threads": threads, "markdown": markdown(results, threads)}


def markdown(results: dict, threads: int) -> list[str]:
    rows, notes = [], []
    for name, entry in results.items():
        for mask in ("encoder", "decoder"):
            fig = entry[mask]
            before, after = fig["before"], fig["after"]
            scaled = before.get("scaled_from_rows")
            mark = "*" if scaled else ""
            if scaled:
                notes.append(
                    f"*{name}, {mask}: the old way measured on {scaled} of {entry['rows']} rows and scaled "
                    "by rows x length^2 (linear in rows at a fixed length)."
                )
            ratio = before["peak_gib"] / max(after["peak_gib"], 1 / 1024)
            rows.append(
                [
                    name,
                    mask,
                    f"{entry['rows']} x {fig['length']}",
                    f"{before['peak_gib'] * 1024:.0f} MiB{mark}",
                    f"{before['seconds'] * 1e3:.0f} ms{mark}",
                    f"{after['peak_gib'] * 1024:.1f} MiB",
                    f"{after['seconds'] * 1e3:.1f} ms",
                    f"{'>' if after['peak_gib'] < 1 / 1024 else ''}{ratio:.0f}x",
                ]
            )
    header = [
        "shape",
        "mask",
        "rows x length",
        "before: peak host memory",
        "before: time",
        "after: peak host memory",
        "after: time",
        "memory before / after",
    ]
    lines = (
        markdown_table(header, rows).split("\n")
        + [
            "",
            "Peak RSS of one build in a fresh CPU process over that just before it (inputs built, a small "
            f"build done first); time: median build, {threads} torch thread(s). Images of 112..4096 patches, "
            "captions of 77 tokens, block 128.",
        ]
        + notes
    )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-old-gib",
        type=float,
        default=8.0,
        help="measure the old way on fewer rows (and scale) where it would pass this",
    )
    parser.add_argument(
        "--max-old-seconds", type=float, default=60.0, help="likewise where one old build would take longer than this"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each build (one by default: on a loaded machine more spin)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one build, fresh process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    figures = measure(max_old_gib=args.max_old_gib, max_old_seconds=args.max_old_seconds, threads=args.threads)
    print("\n".join(figures["markdown"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
