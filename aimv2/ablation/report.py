"""The ablation's summary: mean and spread over seeds per variant and task, as JSON and Markdown,
with the command, seeds and machine that made it (so a committed table says how to remake it), and
every trained run's final training and held-out validation losses.

The ablation's picture: per head kind, grouped bars (tasks x variants) of the mean top-1 over
seeds, error bars of one sample std, every seed as a dot, chance as a dashed tick (matplotlib, Agg).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

from aimv2.ablation.plan import DESCRIPTIONS, PROBE_DEFAULTS, VARIANTS, AblationPlan
from aimv2.fileio import atomic_write, markdown_table


def machine_info() -> dict:
    """CPU model, cores, date, torch version: what a reader needs to judge the numbers and timings."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def _stats(values: list[float], digits: int = 2) -> dict:
    """Mean, sample standard deviation (0 for one seed), range, count."""
    return {
        "mean": round(statistics.fmean(values), digits),
        "std": round(statistics.stdev(values), digits) if len(values) > 1 else 0.0,
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def _at_edge(top1_by_lr: dict[str, float]) -> bool:
    """Whether the lowest or highest lr of the grid beats every lr between them: a grid that cuts the
    optimum off. Ties (saturated tasks at 100%) do not count; grids of fewer than 3 lrs cannot tell."""
    values = [top1_by_lr[k] for k in sorted(top1_by_lr, key=float)]
    return len(values) >= 3 and max(values[0], values[-1]) > max(values[1:-1])


def trained_terms(variant: str) -> set[str]:
    """The loss terms a variant's objective weighs (> 0): "image" (alpha), "caption" (text_weight)."""
    weights = dict(o.split("=", 1) for o in VARIANTS.get(variant) or [])
    return {
        term
        for term, key in (("image", "objective.alpha"), ("caption", "objective.text_weight"))
        if float(weights.get(key, 1.0)) > 0
    }


def summarize_losses(losses: list[dict]) -> dict:
    """Per variant: for "train" and "val", each term's statistics over seeds (4 decimals) and whether the
    variant's objective trains it ("trained": false for a term of weight 0, logged but never optimized)."""
    table: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in losses):
        rows = [r for r in losses if r["variant"] == variant]
        trained = trained_terms(variant)
        entry: dict = {}
        for split in ("train", "val"):
            terms = dict.fromkeys(t for r in rows for t in r.get(split, {}))
            entry[split] = {}
            for term in terms:
                values = [r[split][term] for r in rows if term in r.get(split, {})]
                entry[split][term] = _stats(values, 4) | {
                    "trained": term == "total" or term in trained,
                    "per_seed": {str(r["seed"]): r[split][term] for r in rows if term in r.get(split, {})},
                }
        table[variant] = entry
    return table


def summarize(plan: AblationPlan, records: list[dict], command: str, losses: list[dict] | None = None) -> dict:
    """Every record plus, per head kind, variant and task, the statistics over seeds."""
    kinds = sorted({k for r in records for k in r["best"]}, key=lambda k: (k != "attentive", k))
    variants = [v for v in plan.variants if any(r["variant"] == v for r in records)]
    table: dict = {}
    for kind in kinds:
        table[kind] = {}
        for variant in variants:
            rows = [r for r in records if r["variant"] == variant and kind in r["best"]]
            per_task = {t.name: [r["best"][kind]["top1"] for r in rows if r["task"] == t.name] for t in plan.tasks}
            table[kind][variant] = {
                task: _stats(v)
                | {"per_seed": {str(r["seed"]): r["best"][kind]["top1"] for r in rows if r["task"] == task}}
                for task, v in per_task.items()
                if v
            }
            seeds = sorted({r["seed"] for r in rows})
            task_means = [statistics.fmean(r["best"][kind]["top1"] for r in rows if r["seed"] == s) for s in seeds]
            table[kind][variant]["mean over tasks"] = _stats(task_means) | {
                "per_seed": {str(s): round(m, 2) for s, m in zip(seeds, task_means)}
            }
            if rows and all("val_chosen_top1" in r["best"][kind] for r in rows):
                biased = [
                    statistics.fmean(r["best"][kind]["val_chosen_top1"] for r in rows if r["seed"] == s) for s in seeds
                ]
                table[kind][variant]["mean over tasks, chosen on val"] = _stats(biased) | {
                    "per_seed": {str(s): round(m, 2) for s, m in zip(seeds, biased)}
                }
    chance = {r["task"]: round(100.0 / r["classes"], 2) for r in records}
    edges = [(r, kind) for r in records for kind in r["top1_by_lr"] if _at_edge(r["top1_by_lr"][kind])]
    selected_on = sorted({r.get("selected_on", "val") for r in records})
    if selected_on == ["select"]:
        metric = (
            "top-1 (%) on the task's val split of the head of each kind chosen by its top-1 on the selection "
            "split (a class-stratified part of the train split held out from head training, or data.select)"
        )
    else:
        metric = "top-1 (%) of the best head of each kind on the task's val split (the probe's grid)"
    return {
        "command": command,
        "machine": machine_info(),
        "seeds": sorted({r["seed"] for r in records}),
        "variants": {v: DESCRIPTIONS[v] for v in variants},
        "tasks": [asdict(t) | {"chance": chance.get(t.name)} for t in plan.tasks],
        "pretrain_config": plan.pretrain_config,
        "pretrain_overrides": plan.pretrain_overrides,
        "probe_config": plan.probe_config,
        "probe_defaults": PROBE_DEFAULTS,
        "probe_overrides": plan.probe_overrides,
        "metric": metric,
        "selected_on": selected_on[0] if len(selected_on) == 1 else selected_on,
        "best_lr_at_grid_edge": f"{len(edges)} of {sum(len(r['best']) for r in records)} probes"
        + "".join(f"; {k}: {sum(1 for _, kk in edges if kk == k)}" for k in kinds),
        "summary": table,
        "losses": summarize_losses(losses or []),
        "runs": records,
        "pretrain_runs": losses or [],
    }


def _cell(s: dict) -> str:
    return f"{s['mean']:.1f} ± {s['std']:.1f}" if s["n"] > 1 else f"{s['mean']:.1f}"


def _loss_cell(s: dict | None) -> str:
    if s is None:
        return ""
    if not s["trained"]:
        return "–"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def selection_lines(summary: dict) -> list[str]:
    """What choosing each head on val (the split it is scored on) would have reported instead: the mean over
    tasks of the val top-1 of the best head on val, beside the reported one (chosen on the selection split)."""
    key = "mean over tasks, chosen on val"
    rows = [
        (kind, variant, cells)
        for kind, by_variant in summary["summary"].items()
        for variant, cells in by_variant.items()
        if key in cells
    ]
    if not rows:
        return []
    header = ["probe", "variant", "mean over tasks (chosen on select, reported)", "chosen on val", "difference"]
    table = [
        [
            kind,
            variant,
            _cell(cells["mean over tasks"]),
            _cell(cells[key]),
            f"{cells[key]['mean'] - cells['mean over tasks']['mean']:+.1f}",
        ]
        for kind, variant, cells in rows
    ]
    lines = ["## choosing heads on val instead", "", markdown_table(header, table)]
    lines += [
        "",
        "Chosen on val: the val top-1 of the head with the best val top-1, the same heads (trained on the "
        "same part of train); by construction at least the reported one.",
        "",
    ]
    return lines


def loss_lines(summary: dict) -> list[str]:
    """The losses table: final training and held-out validation losses per term, mean ± std over seeds."""
    losses = summary.get("losses") or {}
    if not losses:
        return []
    runs = summary.get("pretrain_runs") or []
    train_steps = sorted({tuple(r["train_steps"]) for r in runs if "train_steps" in r})
    val_steps = sorted({r["val_step"] for r in runs if "val_step" in r})
    table = [
        [variant]
        + [_loss_cell(entry.get(split, {}).get(term)) for split in ("train", "val") for term in ("image", "caption")]
        for variant, entry in losses.items()
    ]
    lines = [
        "## pre-training losses",
        "",
        markdown_table(["variant", "train image", "train caption", "val image", "val caption"], table),
    ]
    window = ", ".join(f"steps {a}-{b}" for a, b in train_steps) or "none logged"
    lines += [
        "",
        f"Train: mean over the last 10% of logged steps ({window}) of each term (image: next-patch L2 on "
        "normalized pixels, non-prefix patches; caption: nats per token). Val: the held-out validation loss "
        f"(data.val: the same terms, fixed prefixes, eval transform) at step {', '.join(map(str, val_steps)) or '-'}. "
        "– marks a term the variant's objective does not weigh (logged, never optimized; the bidirectional "
        "captioning encoder has no image targets). Per-seed values and every evaluation are in the JSON.",
        "",
    ]
    return lines


def _short(path: str | None) -> str:
    """A shipped config's path from its configs/ folder on (where the package is installed does not matter)."""
    if not path:
        return "the default probe config"
    parts = Path(path).parts
    return "/".join(parts[parts.index("configs") :]) if "configs" in parts else str(path)


def ablation_markdown(summary: dict) -> str:
    """ablation.md: one table per head kind: variants as rows, tasks as columns, mean ± std over seeds."""
    tasks = summary["tasks"]
    m = summary["machine"]
    head = (
        ["variant"]
        + [t["name"] + (" (named)" if t["named"] else " (unnamed)" if t["named"] is False else "") for t in tasks]
        + ["mean over tasks"]
    )
    lines = [
        "# Objective ablation",
        "",
        f"`{summary['command']}`" if summary["command"] else "",
        "",
        f"Seeds {', '.join(map(str, summary['seeds']))}; cells are mean ± sample std over seeds of the "
        f"{summary['metric']}. (named) tasks ask for what the pre-training captions say; (unnamed) tasks "
        "for what they never say.",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m.get('torch_threads')} torch threads)"
        + (f", {m['gpu']}" if m["gpu"] else "")
        + f"; torch {m['torch']}; {m['date']}.",
        "",
    ]
    for kind, by_variant in summary["summary"].items():
        rows = [
            [variant]
            + [_cell(cells[t["name"]]) if t["name"] in cells else "" for t in tasks]
            + [_cell(cells["mean over tasks"])]
            for variant, cells in by_variant.items()
        ]
        rows.append(["chance"] + [f"{t['chance']:.1f}" if t["chance"] else "" for t in tasks] + [""])
        lines += [f"## {kind} probe", "", markdown_table(head, rows), ""]
    lines += selection_lines(summary)
    lines += loss_lines(summary)
    lines += [
        "Variants: " + "; ".join(f"`{k}` = {v}" for k, v in summary["variants"].items()) + ".",
        "Probe: "
        + " ".join(
            [
                _short(summary.get("probe_config")),
                *summary.get("probe_defaults", []),
                *summary.get("probe_overrides", []),
            ]
        )
        + ".",
        f"Probes whose best lr is at an edge of the grid (better than every lr inside it"
        f"{', on the selection split' if summary.get('selected_on') == 'select' else ''}): "
        f"{summary['best_lr_at_grid_edge']}.",
        "",
    ]
    return "\n".join(lines)


def write_summary(plan: AblationPlan, records: list[dict], command: str, losses: list[dict] | None = None) -> dict:
    """ablation.json, ablation.md and ablation.png in the plan's output directory."""

    summary = summarize(plan, records, command, losses)
    out = Path(plan.out)
    atomic_write(out / "ablation.json", json.dumps(summary, indent=1) + "\n")
    atomic_write(out / "ablation.md", ablation_markdown(summary))
    plot_summary(summary, out / "ablation.png")
    return summary


def plot_summary(summary: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimv2.fileio import atomic_file

    tasks = summary["tasks"]
    kinds = list(summary["summary"])
    fig, axes = plt.subplots(
        len(kinds),
        1,
        figsize=(max(6.0, 1.6 * len(tasks) + 2), 3.6 * len(kinds)),
        squeeze=False,
        constrained_layout=True,
    )
    for ax, kind in zip(axes[:, 0], kinds):
        variants = list(summary["summary"][kind])
        width = 0.8 / max(1, len(variants))
        for j, variant in enumerate(variants):
            cells = summary["summary"][kind][variant]
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(tasks))]
            stats = [cells.get(t["name"]) for t in tasks]
            ax.bar(
                [x for x, s in zip(xs, stats) if s],
                [s["mean"] for s in stats if s],
                width * 0.92,
                yerr=[s["std"] for s in stats if s],
                capsize=2,
                label=variant,
                color=f"C{j}",
                alpha=0.85,
            )
            for x, s in zip(xs, stats):
                if s:
                    seeds = list(s["per_seed"].values())
                    ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
        for i, t in enumerate(tasks):
            if t.get("chance"):
                ax.hlines(t["chance"], i - 0.45, i + 0.45, colors="grey", linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(
            [
                t["name"] + ("\n(named)" if t.get("named") else "\n(unnamed)" if t.get("named") is False else "")
                for t in tasks
            ]
        )
        ax.set_ylabel(f"{kind} probe top-1 (%)")
        ax.set_ylim(0, 114)  # room above 100 for the legend: saturated tasks reach the top
        ax.set_yticks(range(0, 101, 20))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncol=len(variants), loc="upper center")
    seeds = ", ".join(map(str, summary["seeds"]))
    fig.suptitle(f"objective ablation: mean ± std over seeds {seeds} (dots: seeds; dashes: chance)", fontsize="medium")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
