"""The data path at a recipe's scale, measured by simulation with the project's own code.

No machine here has 350,000 shards or 256 GPUs, so this script runs the real planning, stream-state,
checkpoint-state and shard-listing code (aimv2.data.shardlist, .manifest, .epoch_plan, .stream,
.loader; the evaluation reader's plans, aimv2.data.every_sample) on a virtual data set: shard names, sizes
and sample counts without tar bytes (the manifests are real files; benchmarks/virtual_data.py). Only what
cannot exist here is stood in: the
shards' own files (a stand-in file system answers for them and counts every operation), the
collectives (each rank's tensor is built by its own loader, then stacked as an all-gather would
stack them: the bytes they move are counted) and the training steps (positions after K steps are
computed from the plan; at the test's size `tests/test_scale.py` checks them against the real stream
reading virtual tars).

The size to plan for: an epoch of 3.5B samples in 350,000 img2dataset shards of about
10,000, the L recipe's five sources, 32 nodes x 8 GPUs x 8 workers = 2,048 readers, batch 32 per GPU,
shuffle buffer 2,000; a checkpoint 40% into the epoch, then a resume on 128 and on 384 ranks; and the
resampled horizon of the paper: 12B samples, 1.46M steps at global batch 8,192.

    .venv/bin/python benchmarks/scale.py                 # the recipe's size (a few minutes), results/scale.md
    .venv/bin/python benchmarks/scale.py --size small    # what tests/test_scale.py runs

Figures are per rank unless said otherwise; sizes and counts are deterministic, times are this
machine's (one process, one core).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import pickle
import sys
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aimv2.config.schema import DataConfig  # noqa: E402
from aimv2.data.every_sample import plan_ranges, read_cost  # noqa: E402
from aimv2.data.loader import EpochAwareLoader, saved_lanes  # noqa: E402
from aimv2.data.stream import ShardStream  # noqa: E402
from aimv2.pretraining.pretrain import PretrainDataModule  # noqa: E402
from common import machine, machine_line, publish, table  # noqa: E402
from virtual_data import SIZES, Operations, Size, epoch_position, stream_for, virtual_set  # noqa: E402


# -- measuring -------------------------------------------------------------------------------
@contextmanager
def traced():
    """Python and NumPy allocations (tracemalloc) made in the block: {"current", "peak"} in bytes."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = {}
    try:
        yield result
    finally:
        result["current"], result["peak"] = tracemalloc.get_traced_memory()
        tracemalloc.stop()


def saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def start_up(cfg: DataConfig, ops: Operations, world: int) -> dict:
    """What each rank does at start: the data module's checks (every rank), then the sources resolved by
    rank 0 and broadcast (aimv2.engine.stream_resume). File operations per rank and the broadcast's bytes."""
    with ops.installed():
        ops.ops = {}
        data = PretrainDataModule(cfg, 224)  # every rank: the first shard of each source
        other_rank = dict(ops.ops)
        start = time.perf_counter()
        sources = data.resolve_sources()  # rank 0
        seconds = time.perf_counter() - start
        rank0 = dict(ops.ops)  # the checks, then the resolution
        with traced() as memory:  # what the tables hold (a second resolution, traced: slower)
            kept = data.resolve_sources()
        del kept
    return {
        "sources": sources,
        "rank0_ops": rank0,
        "rank_ops": other_rank,
        "resolve_seconds": seconds,
        "table_bytes": memory["current"],
        "broadcast_bytes": len(pickle.dumps(sources)),
        "total_ops": sum(rank0.values()) + (world - 1) * sum(other_rank.values()),
    }


def gathered_state(streams: list[ShardStream], produced_by_rank, plan) -> tuple[dict, dict]:
    """Rank 0's checkpoint state: every rank's loader builds its table (its lanes' positions and segment
    bits, the real `position_state`), the all-gather is the stack of them. Returns (state, bytes moved)."""
    tables = []
    loaders = []
    for stream in streams:
        loader = EpochAwareLoader(stream, num_workers=0) if stream.mode == "epoch" else EpochAwareLoader(stream)
        loader.epoch = stream.epoch
        loader.consumed = produced_by_rank(stream)[0]
        loader.lanes = produced_by_rank(stream)[1]
        loader._gather = lambda t: (tables.append(t), t[None])[1]
        loader.position_state()
        loaders.append(loader)
    stacked = torch.stack(tables)
    loaders[0]._gather = lambda t: stacked
    state = loaders[0].position_state()
    sent = tables[0].numel() * tables[0].element_size()
    return state, {"sent": sent, "received": sent * len(tables)}


def rank_streams(sources, size: Size, world: int, mode: str = "epoch") -> list[ShardStream]:
    """One stream per rank sharing one table of shards (each rank holds its own in a real run)."""
    first = stream_for(sources, size, world, 0, mode)
    out = [first]
    for rank in range(1, world):
        other = copy.copy(first)
        other.rank = rank
        out.append(other)
    return out


def rank_memory(sources, size: Size) -> dict:
    """One rank's data state in its training process (its stream with its own copy of the shard table, its
    loader, the epoch's plan, a checkpoint's state) and what each of its data workers receives (the stream,
    pickled) and builds (its plan)."""
    with traced() as memory:
        stream = stream_for(sources, size, size.world)
        loader = EpochAwareLoader(stream, num_workers=0)
        loader._gather = lambda t: t[None].expand(size.world, *t.shape)
        plan = loader._plan()
        state = loader.position_state()
    return {
        "process": memory["peak"],
        "worker_pickle": len(pickle.dumps(stream)),
        "worker_plan": plan.order.nbytes + plan.ends.nbytes,
        "state_bytes": saved_bytes(state),
    }


def epoch_checkpoint(sources, size: Size) -> dict:
    """Every rank and worker at a point `size.at` into the epoch: the plan per rank, the state per rank,
    the checkpoint, the bytes the all-gather moves; then the resumes on other numbers of ranks."""
    streams = rank_streams(sources, size, size.world)
    stream = streams[0]
    start = time.perf_counter()
    plan = stream.plan_for(0, None)
    plan_seconds = time.perf_counter() - start
    # every slot of every rank: its ranges (the plan's arithmetic), all of them together exactly the epoch
    slots = stream.num_slots
    start = time.perf_counter()
    covered = sum(sum(end - first for _, first, end in plan.slot_units(s)) for s in range(slots))
    units_seconds = (time.perf_counter() - start) / size.world
    assert covered == plan.total == stream.total, (covered, plan.total)
    steps = int(size.at * stream.full_batches * size.workers)

    def positions(rank_stream):
        lanes = {}
        for w in range(size.workers):
            slot = rank_stream.rank * size.workers + w
            produced = steps // size.workers + (w < steps % size.workers)
            lanes[slot] = epoch_position(rank_stream, plan, slot, produced)
        return steps, lanes

    start = time.perf_counter()
    state, moved = gathered_state(streams, positions, plan)
    state_seconds = (time.perf_counter() - start) / size.world
    consumed_samples = sum(pos[3] * size.batch for pos in saved_lanes(state).values())
    out = {
        "total": stream.total,
        "shards": len(stream.shards),
        "slots": slots,
        "steps": steps,
        "plan_seconds": plan_seconds,
        "plan_bytes": plan.order.nbytes + plan.ends.nbytes,
        "units_seconds_per_rank": units_seconds,
        "state_seconds_per_rank": state_seconds,
        "checkpoint_bytes": saved_bytes(state),
        "gather": moved,
        "consumed_samples": consumed_samples,
        "resumes": {},
    }
    for world in size.resumes:
        out["resumes"][world] = resume_elsewhere(sources, size, world, state, stream.total - consumed_samples)
    return out


def resume_elsewhere(sources, size: Size, world: int, state: dict, left: int) -> dict:
    """Rank 0 of a run resumed on `world` ranks: the elastic bookkeeping (real `load_position_state`), its
    time and memory, the plan of what is left (exactly the samples not consumed), and its checkpoint."""
    stream = stream_for(sources, size, world)
    loader = EpochAwareLoader(stream, num_workers=0)
    start = time.perf_counter()
    loader.load_position_state(state)
    seconds = time.perf_counter() - start
    with traced() as memory:  # the same again, traced (slower): its peak memory
        EpochAwareLoader(stream_for(sources, size, world), num_workers=0).load_position_state(state)
    pending = loader._pending
    plan = stream.plan_for(pending["epoch"], pending["base"])
    assert plan.total == left, (plan.total, left)  # every sample not consumed, and only those
    loader.epoch, loader.consumed, loader.base = pending["epoch"], pending["consumed"], pending["base"]
    loader.base_consumed, loader.lanes = pending["base_consumed"], {}
    tables = []
    loader._gather = lambda t: (tables.append(t), t[None].expand(world, *t.shape))[1]
    resumed_state = loader.position_state()
    sent = tables[0].numel() * tables[0].element_size()
    return {
        "seconds": seconds,
        "traced": memory["peak"],
        "left": left,
        "batches_per_slot": plan.batches_per_slot,
        "base_bytes": pending["base"].nbytes(),
        "partial_shards": len(pending["base"].partial),
        "checkpoint_bytes": saved_bytes(resumed_state),
        "gather": {"sent": sent, "received": sent * world},
    }


def resampled_horizon(sources, size: Size) -> dict:
    """Resampled mode at step 0 and at the paper's last step: the state does not grow with steps."""
    streams = rank_streams(sources, size, size.world, mode="resampled")
    per_lane = size.resampled_steps // size.workers  # batches each lane produced
    samples = per_lane * size.batch
    out = {}
    for name, produced in (("step 0", 0), ("step 1.46M", per_lane)):

        def positions(rank_stream, produced=produced):
            lanes = {}
            for w in range(size.workers):
                lane = rank_stream.rank * size.workers + w
                draws = [int(samples * wt / np.mean(size.per_shard)) if produced else 0 for wt in size.weights]
                lanes[lane] = (
                    0,
                    samples // rank_stream.segment if produced else 0,
                    17 if produced else 0,
                    produced,
                    *[v for d in draws for v in (d, 1234 if produced else 0)],
                )
            return size.resampled_steps if produced else 0, lanes

        state, moved = gathered_state(streams, positions, None)
        out[name] = {"checkpoint_bytes": saved_bytes(state), "gather": moved}
    resumed = {}
    for world in size.resumes:
        stream = stream_for(sources, size, world, mode="resampled")
        loader = EpochAwareLoader(stream)
        start = time.perf_counter()
        loader.load_position_state(state)
        resumed[world] = {"seconds": time.perf_counter() - start, "lanes": stream.lanes}
    out["resumes"] = resumed
    return out


def validation_reads(size: Size) -> list[dict]:
    rows = []
    for shards in (1, 4):
        ranges = [(f"/val/{i:05d}.tar", 0, size.held_out // shards) for i in range(shards)]
        for workers in (0, size.workers):
            cost = read_cost(plan_ranges(ranges, size.world, workers))
            rows.append(
                {
                    "shards": shards,
                    "workers": workers,
                    "slots": cost["slots"],
                    "held_out": cost["held_out"],
                    "before": cost["before_ratio"],
                    "after": cost["after_ratio"],
                }
            )
    return rows


def measure(size: Size, masks: bool = True) -> dict:
    root = Path(tempfile.mkdtemp(prefix="aimv2-scale-"))
    result: dict = {"size": {k: v for k, v in size.__dict__.items()}}
    cfg, ops = virtual_set(root / "indexed", size)
    start = start_up(cfg, ops, size.world)
    sources = start.pop("sources")
    result["start"] = start
    cfg_bare, ops_bare = virtual_set(root / "bare", size, manifests=False)
    bare = start_up(cfg_bare, ops_bare, size.world)
    bare.pop("sources")
    result["start_without_manifest"] = bare
    result["rank_memory"] = rank_memory(sources, size)
    result["epoch"] = epoch_checkpoint(sources, size)
    # the same shards holding 10x the samples: nothing of the state may grow with them
    cfg10, ops10 = virtual_set(root / "tenfold", size, scale=10)
    sources10 = start_up(cfg10, ops10, size.world)["sources"]
    tenfold = epoch_checkpoint(sources10, replace(size, resumes=()))
    result["epoch_tenfold"] = {k: tenfold[k] for k in ("total", "checkpoint_bytes", "gather", "plan_bytes")}
    result["resampled"] = resampled_horizon(sources, size)
    result["validation"] = validation_reads(size)
    if masks:
        from block_masks import measure as measure_masks

        result["masks"] = measure_masks()
    return result


# -- the report ------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown(r: dict, info: dict, command: str) -> list[str]:
    size, epoch, start = r["size"], r["epoch"], r["start"]
    world, workers = size["world"], size["workers"]
    lines = [
        f"# The data path at scale ({world} ranks x {workers} workers, {epoch['shards']:,} shards, "
        f"{epoch['total'] / 1e9:.2f}B samples)",
        "",
        f"`{command}` on {machine_line(info)}, {info['date']}. Sizes and counts are deterministic; times are "
        "this machine's, one core. How it is simulated: the module doc of benchmarks/scale.py. The same "
        "figures for the code before the change: [scale_before.md](scale_before.md).",
        "",
    ]
    bare = r["start_without_manifest"]
    lines += ["## At start (every start and every requeue)", ""]
    lines += table(
        ["", "with manifests (`aimv2 shards`, `aimv2 shards index`)", "without (img2dataset output as is)"],
        [
            [
                "metadata files read by rank 0",
                f"{start['rank0_ops'].get('open', 0):,} (a manifest per source)",
                f"{bare['rank0_ops'].get('open', 0):,} (a stats file and 4 KiB of each shard)",
            ],
            [
                "file operations of rank 0, all kinds",
                f"{sum(start['rank0_ops'].values()):,}",
                f"{sum(bare['rank0_ops'].values()):,}",
            ],
            [
                "file operations of every other rank",
                f"{sum(start['rank_ops'].values()):,} (a stat of each source's first shard)",
                f"{sum(bare['rank_ops'].values()):,}",
            ],
            [f"file operations of all {world} ranks", f"{start['total_ops']:,}", f"{bare['total_ops']:,}"],
            ["rank 0 resolving the sources", f"{start['resolve_seconds']:.1f} s", f"{bare['resolve_seconds']:.1f} s"],
            [
                "the shard table (per rank; broadcast by rank 0)",
                f"{mib(start['table_bytes'])} in memory, {mib(start['broadcast_bytes'])} broadcast",
                f"{mib(bare['broadcast_bytes'])} broadcast",
            ],
        ],
    )
    mem = r["rank_memory"]
    lines += [
        "",
        f"Host memory of one rank's data state: {mib(mem['process'])} at most in its training process (the "
        f"shard table, the epoch plan, the loader, a checkpoint's state); each of its {workers} data workers "
        f"receives the stream pickled ({mib(mem['worker_pickle'])}) and plans its epoch "
        f"({mib(mem['worker_plan'])}). Nothing of it grows with the samples.",
        "",
    ]
    ten = r["epoch_tenfold"]
    lines += ["", f"## Epoch mode: a checkpoint {size['at']:.0%} into the epoch (step {epoch['steps']:,})", ""]
    lines += table(
        [
            "per rank",
            f"{epoch['total'] / 1e9:.2f}B samples",
            f"the same shards x 10 samples ({ten['total'] / 1e9:.1f}B)",
        ],
        [
            [
                "epoch plan (all shards, seeded order, cut into slots)",
                f"{epoch['plan_seconds']:.2f} s, {mib(epoch['plan_bytes'])}",
                mib(ten["plan_bytes"]),
            ],
            ["this rank's slot ranges (bisection)", f"{epoch['units_seconds_per_rank'] * 1e3:.1f} ms", ""],
            [
                "data state built for the checkpoint (positions, segment bits)",
                f"{epoch['state_seconds_per_rank'] * 1e3:.0f} ms",
                "",
            ],
            [
                "all-gather at a checkpoint: sent / received",
                f"{mib(epoch['gather']['sent'])} / {mib(epoch['gather']['received'])}",
                f"{mib(ten['gather']['sent'])} / {mib(ten['gather']['received'])}",
            ],
            ["data state in the checkpoint", mib(epoch["checkpoint_bytes"]), mib(ten["checkpoint_bytes"])],
        ],
    )
    lines += [
        "",
        "Resumed under another layout (the elastic path: rank 0 of the new layout; the plan of what is "
        "left holds exactly the samples the checkpoint had not consumed, checked):",
        "",
    ]
    rows = []
    for w, res in epoch["resumes"].items():
        rows.append(
            [
                f"{w} ranks x {workers}",
                f"{res['seconds']:.2f} s",
                mib(res["traced"]),
                f"{res['left']:,}",
                f"{res['partial_shards']:,} ({mib(res['base_bytes'])})",
                mib(res["checkpoint_bytes"]),
                f"{mib(res['gather']['sent'])} / {mib(res['gather']['received'])}",
            ]
        )
    lines += table(
        [
            "resumed on",
            "bookkeeping time",
            "its peak memory",
            "samples left, planned",
            "half-read shards in the consumed set",
            "checkpoint data state",
            "all-gather sent / received",
        ],
        rows,
    )
    res = r["resampled"]
    lines += ["", f"## Resampled mode: the paper's horizon ({size['resampled_steps']:,} steps)", ""]
    lines += table(
        ["", "checkpoint data state", "all-gather sent / received per rank"],
        [
            [name, mib(v["checkpoint_bytes"]), f"{mib(v['gather']['sent'])} / {mib(v['gather']['received'])}"]
            for name, v in res.items()
            if name != "resumes"
        ],
    )
    lines += [
        "",
        "Resumed on "
        + ", ".join(f"{w} ranks: {v['seconds'] * 1e3:.0f} ms, {v['lanes']:,} lanes" for w, v in res["resumes"].items())
        + ".",
        "",
    ]
    lines += ["## Held-out validation: tar samples read per evaluation / held-out samples", ""]
    lines += table(
        [
            "held-out shards",
            "workers per rank",
            "slots",
            "from each shard's start (before)",
            "from each range's first sample (now)",
        ],
        [[v["shards"], v["workers"], v["slots"], f"{v['before']:.1f}x", f"{v['after']:.2f}x"] for v in r["validation"]],
    )
    if "masks" in r:
        lines += ["", "## FlexAttention block masks: peak host memory of a build (benchmarks/block_masks.py)", ""]
        lines += r["masks"]["markdown"]
    lines += ["", "## Targets", ""]
    lines += table(["target", "measured", "met"], targets(r))
    return lines


def targets(r: dict) -> list[list[str]]:
    epoch, ten, start = r["epoch"], r["epoch_tenfold"], r["start"]
    same_state = epoch["checkpoint_bytes"] == ten["checkpoint_bytes"] and epoch["gather"] == ten["gather"]
    reads = max(start["rank0_ops"].get("open", 0), max(start["rank_ops"].get("open", 0), 0))
    sources = len(r["size"]["shards"])
    worst_val = max(v["after"] for v in r["validation"])
    rows = [
        [
            "data state per rank and checkpoint independent of the sample count",
            f"{mib(epoch['checkpoint_bytes'])} at {epoch['total'] / 1e9:.1f}B samples and at {ten['total'] / 1e9:.0f}B",
            "yes" if same_state else "NO",
        ],
        [
            "no collective whose volume grows with samples",
            f"all-gather {mib(epoch['gather']['received'])} received per rank at either size",
            "yes" if same_state else "NO",
        ],
        [
            "at most one metadata file read per rank at start (per source)",
            f"rank 0: {start['rank0_ops'].get('open', 0)} manifests for {sources} sources; other ranks: "
            f"{start['rank_ops'].get('open', 0)}",
            "yes" if reads <= sources else "NO",
        ],
        [
            "an epoch plan in under 10 s per rank",
            f"{epoch['plan_seconds']:.2f} s",
            "yes" if epoch["plan_seconds"] < 10 else "NO",
        ],
        [
            "validation reads at most 1.25x its held-out samples",
            f"{worst_val:.2f}x",
            "yes" if worst_val <= 1.25 else "NO",
        ],
    ]
    if "masks" in r:
        builds = [entry[mask] for entry in r["masks"]["shapes"].values() for mask in ("encoder", "decoder")]
        after = max(b["after"]["peak_gib"] for b in builds) * 1024
        before = max(b["before"]["peak_gib"] for b in builds) * 1024
        rows.append(
            [
                "FlexAttention block masks built without a T x T tensor (peak host memory of a build)",
                f"at most {after:.1f} MiB (was up to {before:,.0f} MiB)",
                "yes" if after < 16 else "NO",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="recipe")
    parser.add_argument("--no-masks", action="store_true", help="skip the block-mask builds (about a minute)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = measure(SIZES[args.size], masks=not args.no_masks)
    info = machine()
    command = (
        "python benchmarks/scale.py"
        + (f" --size {args.size}" if args.size != "recipe" else "")
        + (" --no-masks" if args.no_masks else "")
    )
    data = {"machine": info, **json.loads(json.dumps(result, default=str))}
    publish("scale" if args.size == "recipe" else f"scale_{args.size}", data, markdown(result, info, command))


if __name__ == "__main__":
    main()
