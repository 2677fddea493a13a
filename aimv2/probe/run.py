"""`aimv2 probe` orchestration: encoder and data, the grid of heads, resume, results JSON and table.

Run directory:
  config.yaml                 the resolved probe config
  features/{train,val}.safetensors   cached mode: frozen features (reused when made the same way)
  features/select.safetensors        with data.select: the selection split's
  heads.pt                    head-training state after the last finished epoch (atomic)
  results.json, results.md    every head's top-1/top-5 on val (and on the selection split), the best marked

Which head is best. With a selection split (cached mode: data.select, or data.select_fraction of train
held out from head training by `hold_out`) the best head overall and of each kind is the one with the
highest top-1 on that split, and it is reported with its top-1 on val (`selected_on: select`): a head
chosen on the split it is scored on reports the best of the grid's noisy scores, biased upwards.
Without one, heads are chosen on val, as before (`selected_on: val`).

Side-by-side probe results of several encoders on the same data (e.g. pre-trained vs random init).

Why a separate table: a probe number alone says little on a toy set (a random ViT's features already
separate digits somewhat); the evidence that pre-training works is the gap to the same architecture
at its initialization, probed identically.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from aimv2.config import save_config
from aimv2.data.samples import eval_transform
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.fileio import atomic_write, markdown_table
from aimv2.models.native import is_native
from aimv2.probe.augmented import AugmentedJob, run_augmented
from aimv2.probe.config import ProbeConfig
from aimv2.probe.data import NativeEvalTransform, match_classes, open_split
from aimv2.probe.features import (
    ExtractJob,
    Preprocessing,
    cached_features,
    check_blocks,
    fit_resolution,
    load_probe_encoder,
    pick_device,
)
from aimv2.probe.head_grid import HeadGrid, grid_specs, load_head_state, save_head_state
from aimv2.probe.heads import encoder_attention_heads
from aimv2.progress import progress as progress_bar


def _identity(path: str, scan_dir: bool = False) -> str:
    """A file's identity for cache keys: resolved path, size and modification time. With scan_dir, a
    directory (ZeRO checkpoint, export) counts the total size and newest time of its files; data
    directories (ImageNet's 1.3M files) are not scanned."""
    p = Path(path)
    if p.is_file():
        stats = [p.stat()]
    elif p.is_dir() and scan_dir:
        stats = [f.stat() for f in p.rglob("*") if f.is_file()]
    else:
        return str(path)
    size, mtime = sum(st.st_size for st in stats), max((st.st_mtime for st in stats), default=0)
    return f"{p.resolve()}:{size}:{int(mtime)}"


def _fingerprint(cfg: ProbeConfig, extra: dict) -> str:
    """What must match for saved head state to be resumed."""
    keys = {
        "mode": cfg.mode,
        "img_size": cfg.img_size,
        "native_patches": list(cfg.native_patches),
        "cache_dtype": cfg.cache_dtype,
        "seed": cfg.seed,
        "data": asdict(cfg.data) | {"num_workers": None},
        "head": asdict(cfg.head),
        "optim": asdict(cfg.optim),
        **extra,
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_probe(
    cfg: ProbeConfig, encoder: torch.nn.Module | None = None, preprocessing: Preprocessing | None = None
) -> dict | None:
    """Probe; returns the results dict (also written as results.json / results.md). An encoder may be
    passed directly (with its preprocessing), else it is loaded from `cfg.checkpoint`."""
    run_dir = cfg.resolved_run_dir()
    train, val = open_split(cfg.data.train, "data.train"), open_split(cfg.data.val, "data.val")
    match_classes(train, val)
    select = open_split(cfg.data.select, "data.select") if cfg.data.select else None
    if select is not None:
        match_classes(train, select)
    if encoder is None:
        encoder, trained_size, preprocessing = load_probe_encoder(cfg.checkpoint)
        source = _identity(cfg.checkpoint, scan_dir=True)
    else:
        trained_size = preprocessing.img_size
        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in encoder.parameters())
        source = f"in-memory encoder {hashlib.sha256(weights).hexdigest()[:16]}"
    size = fit_resolution(encoder, trained_size, cfg.img_size)
    if cfg.native_patches and not is_native(encoder):
        raise UserError(
            f"config key 'native_patches': {cfg.checkpoint or 'the encoder'} is a fixed-size encoder "
            "(a learned position table); native-resolution probing needs a native one (model.native)"
        )
    check_blocks(encoder, cfg.head.blocks)
    encoder.requires_grad_(False).eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunDir(run_dir).config)
    torch.manual_seed(cfg.seed)
    mean, std = preprocessing.mean, preprocessing.std
    progress = cfg.progress_bar
    dim, num_classes = encoder.embed_dim, len(train.classes)
    specs = grid_specs(cfg.head.kinds, cfg.optim.lrs, cfg.optim.weight_decays)
    attention_heads = cfg.head.attention_heads or encoder_attention_heads(encoder)
    grid = HeadGrid(specs, dim, num_classes, cfg.optim, attention_heads)
    started = time.perf_counter()
    info = {
        "checkpoint": cfg.checkpoint,
        "encoder": source,
        "img_size": size,
        "mode": cfg.mode,
        "blocks": list(cfg.head.blocks) or "last",
        "classes": num_classes,
        "attention_heads": attention_heads,
        "run_dir": str(run_dir),
        **({"native_patches": list(cfg.native_patches)} if cfg.native_patches else {}),
    }

    if cfg.mode == "cached":
        pooled = "attentive" not in cfg.head.kinds
        meta = {
            "encoder": source,
            "img_size": str(size),
            "blocks": json.dumps(list(cfg.head.blocks)),
            "pooled": str(pooled),
            "dtype": cfg.cache_dtype,
            "classes": json.dumps(train.classes),
        }
        data = {}
        if cfg.native_patches:  # each image at its own aspect ratio; the cache says so
            transform = NativeEvalTransform(encoder.patch_embed.patch_size[0], *cfg.native_patches, mean, std)
            meta["native_patches"] = json.dumps(list(cfg.native_patches))
        else:
            transform = eval_transform(size, mean, std)
        for name, split in (("train", train), ("val", val)) + ((("select", select),) if select else ()):
            job = ExtractJob(
                encoder,
                split,
                transform,
                list(cfg.head.blocks),
                pooled,
                cfg.cache_dtype,
                cfg.data.batch_size,
                cfg.data.num_workers,
                cfg.accelerator,
                progress,
                native=bool(cfg.native_patches),
            )
            found, reused = cached_features(
                job,
                run_dir / "features" / f"{name}.safetensors",
                meta | {"split": _identity(getattr(cfg.data, name)), "planned": str(split.count)},
                cfg.devices,
            )
            if found is None:
                return None  # a non-zero torchrun rank: its share is done
            print(
                f"probe: {name} features {tuple(found['features'].shape)} "
                f"({'reused from cache' if reused else 'extracted'}), {found['skipped']} corrupt skipped",
                file=sys.stderr,
            )
            data[name] = found
        if cfg.data.select_fraction:
            kept, held = hold_out(data["train"]["labels"], cfg.data.select_fraction, cfg.seed)
            data["train"], data["select"] = rows_of(data["train"], kept), rows_of(data["train"], held, skipped=0)
            info["select"] = f"{cfg.data.select_fraction:g} of data.train, class-stratified (seed {cfg.seed})"
        elif select is not None:
            info["select"] = cfg.data.select
        device = pick_device(cfg.accelerator)
        fp = _fingerprint(cfg, {"encoder": source, "train": len(data["train"]["labels"]), "heads": attention_heads})
        train_cached(grid, data["train"], cfg, device, run_dir / "heads.pt", fp, progress)
        rows = grid.results(evaluate_tensors(grid, data["val"], cfg.data.batch_size, device))
        if "select" in data:
            chosen = grid.results(evaluate_tensors(grid, data["select"], cfg.data.batch_size, device))
            for row, sel in zip(rows, chosen):
                row["select_top1"], row["select_top5"] = sel["top1"], sel["top5"]
            info["select_count"] = len(data["select"]["labels"])
        info |= {
            "train_count": len(data["train"]["labels"]),
            "val_count": len(data["val"]["labels"]),
            "skipped": {"train": data["train"]["skipped"], "val": data["val"]["skipped"]}
            | ({"select": data["select"]["skipped"]} if "select" in data else {}),
        }
    else:
        fp = _fingerprint(cfg, {"encoder": source, "heads": attention_heads})
        found = run_augmented(AugmentedJob(grid, encoder, train, val, cfg, size, mean, std, run_dir / "heads.pt", fp))
        if found is None:
            return None  # a non-zero torchrun rank: its share is done
        rows = found.pop("rows")
        info |= found

    on = "select_" if "select_top1" in rows[0] else ""  # the split heads are chosen on
    best = max(range(len(rows)), key=lambda i: (rows[i][f"{on}top1"], rows[i][f"{on}top5"]))
    for i, row in enumerate(rows):
        row["best"] = i == best
    results = info | {
        "epochs": cfg.optim.epochs,
        "seconds": round(time.perf_counter() - started, 1),
        "selected_on": "select" if on else "val",
        "best": rows[best],
        "heads": rows,
        "best_per_kind": {
            k: max((r for r in rows if r["head"] == k), key=lambda r: r[f"{on}top1"]) for k in cfg.head.kinds
        },
    }
    out = RunDir(run_dir)
    atomic_write(out.results_json, json.dumps(results, indent=1) + "\n")
    table = results_markdown(results)
    atomic_write(out.results_md, table + "\n")
    print(table)
    print(f"results: {out.results_json} and {out.results_md}")
    return results


# -- the selection split ------------------------------------------------------------------------
def hold_out(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held) row indices, both sorted: of each class's rows, round(fraction x n) drawn at random
    (seeded) are held out -- at least one and at most n - 1 when the class has two rows or more; a class
    of one row stays in `kept`. The rows are the cache's (sorted by sample key), so the same split and
    seed hold out the same samples."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    by_class = torch.argsort(labels, stable=True)  # rows grouped by class, in row order: one sort, not a scan per class
    counts = torch.unique(labels, return_counts=True)[1].tolist()
    for rows in by_class.split(counts):
        n = len(rows)
        k = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        held.append(rows[torch.randperm(n, generator=generator)[:k]])
    held_rows = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_rows] = False
    return torch.nonzero(keep).flatten(), held_rows


def rows_of(split: dict, index: torch.Tensor, skipped: int | None = None) -> dict:
    """The rows `index` of a cached split (features, labels and, at native resolution, lengths)."""
    out = {k: split[k][index] for k in ("features", "labels", "lengths") if k in split}
    return out | {"skipped": split["skipped"] if skipped is None else skipped}


# -- training -----------------------------------------------------------------------------------
def train_cached(grid, train: dict, cfg: ProbeConfig, device, state_path: Path, fp: str, progress: bool) -> None:
    feats, labels, lengths = train["features"], train["labels"], train.get("lengths")
    n, bs = len(labels), cfg.data.batch_size
    per_epoch = n // bs if n >= bs else 1  # full batches (BatchNorm needs > 1 sample); all when fewer
    total, warmup = per_epoch * cfg.optim.epochs, per_epoch * cfg.optim.warmup_epochs
    grid.to(device).train()
    start = load_head_state(grid, state_path, fp) if state_path else 0
    bar = progress_bar(total=total, initial=start * per_epoch, desc="heads", unit="step", enable=progress, leave=False)
    for epoch in range(start, cfg.optim.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        for i in range(per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            loss = grid.train_step(
                feats[idx].to(device),
                labels[idx].to(device),
                total,
                warmup,
                lengths=lengths[idx].to(device) if lengths is not None else None,
            )
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
        if state_path:
            save_head_state(grid, state_path, fp, epoch + 1)
    bar.close()


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_tensors(grid: HeadGrid, val: dict, batch_size: int, device) -> dict:
    grid.to(device).eval()
    metrics = grid.new_metrics()
    lengths = val.get("lengths")
    for i in range(0, len(val["labels"]), batch_size):
        rows = slice(i, i + batch_size)
        logits = grid(
            val["features"][rows].to(device).float(), lengths[rows].to(device) if lengths is not None else None
        )
        grid.update_metrics(metrics, logits, val["labels"][rows])
    return metrics


# -- report -------------------------------------------------------------------------------------
def results_markdown(results: dict) -> str:
    """results.md: a Markdown table of every head, the best marked."""
    selected = results.get("selected_on") == "select"
    counts = f"{results['train_count']} train / " + (f"{results['select_count']} select / " if selected else "")
    lines = [
        f"Probe of {results['checkpoint'] or results['encoder']} ({results['mode']} mode, {results['epochs']} epochs, "
        f"img {_resolution(results)}, {results['classes']} classes, {counts}"
        f"{results['val_count']} val images, skipped {results['skipped']})",
        "",
    ]
    if selected:
        lines += [f"Heads chosen on the selection split ({results['select']}), scored on val.", ""]
    chosen = ["select top-1"] if selected else []
    rows = [
        [
            r["head"],
            f"{r['lr']:g}",
            f"{r['wd']:g}",
            *([f"{r['select_top1']:.2f}"] if selected else []),
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            "**best**" if r["best"] else "",
        ]
        for r in results["heads"]
    ]
    lines.append(markdown_table(["head", "lr", "wd", *chosen, "top-1", "top-5", "best"], rows))
    b = results["best"]
    on = f"best on select (top-1 {b['select_top1']:.2f}), on val" if selected else "best on val"
    lines += ["", f"{on}: {b['head']} lr={b['lr']:g} wd={b['wd']:g}: top-1 {b['top1']:.2f}, top-5 {b['top5']:.2f}"]
    return "\n".join(lines)


def _resolution(results: dict) -> str:
    if "native_patches" in results:
        low, high = results["native_patches"]
        return f"native ({low} to {high} patches, own aspect ratio)"
    return str(results["img_size"])


def compare(results: dict[str, dict]) -> dict:
    """{name: run_probe results} -> {"kinds", "rows": {name: {kind: best top-1}}, "gain": first - second}."""
    names = list(results)
    kinds = [k for k in results[names[0]]["best_per_kind"]]
    rows = {name: {k: r["best_per_kind"][k]["top1"] for k in kinds} for name, r in results.items()}
    best_lr = {name: {k: r["best_per_kind"][k]["lr"] for k in kinds} for name, r in results.items()}
    gain = {k: round(rows[names[0]][k] - rows[names[1]][k], 2) for k in kinds} if len(names) > 1 else {}
    return {
        "kinds": kinds,
        "rows": rows,
        "best_lr": best_lr,
        "gain": gain,
        "sources": {name: r["checkpoint"] or r["encoder"] for name, r in results.items()},
        "val_count": results[names[0]].get("val_count"),
        "classes": results[names[0]]["classes"],
    }


def comparison_markdown(cmp: dict) -> str:
    """A Markdown table: one row per encoder, one column per head kind (best top-1 of its grid), then the gain."""
    names = list(cmp["rows"])
    rows = [[name] + [f"{cmp['rows'][name][k]:.2f}" for k in cmp["kinds"]] for name in names]
    if cmp["gain"]:
        rows.append([f"gain ({names[0]} - {names[1]})"] + [f"{cmp['gain'][k]:+.2f}" for k in cmp["kinds"]])
    return markdown_table(["encoder"] + [f"{k} top-1" for k in cmp["kinds"]], rows)


def write_comparison(results: dict[str, dict], out: str | Path, title: str = "") -> dict:
    """OUT.md (title, table, sources) and OUT.json beside it; returns the comparison."""
    cmp = compare(results)
    out = Path(out)
    sources = "\n".join(f"- {name}: {src}" for name, src in cmp["sources"].items())
    atomic_write(out.with_suffix(".md"), "\n\n".join(x for x in (title, comparison_markdown(cmp), sources) if x) + "\n")
    atomic_write(out.with_suffix(".json"), json.dumps(cmp, indent=1) + "\n")
    return cmp
