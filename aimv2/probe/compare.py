"""Side-by-side probe results of several encoders on the same data (e.g. pre-trained vs random init).

Why a separate table: a probe number alone says little on a toy set (a random ViT's features already
separate digits somewhat); the evidence that pre-training works is the gap to the same architecture
at its initialization, probed identically.
"""

from __future__ import annotations

import json
from pathlib import Path

from aimv2.fileio import atomic_write


def compare(results: dict[str, dict]) -> dict:
    """{name: run_probe results} -> {"kinds", "rows": {name: {kind: best top-1}}, "gain": first - second}."""
    names = list(results)
    kinds = [k for k in results[names[0]]["best_per_kind"]]
    rows = {name: {k: r["best_per_kind"][k]["top1"] for k in kinds} for name, r in results.items()}
    best_lr = {name: {k: r["best_per_kind"][k]["lr"] for k in kinds} for name, r in results.items()}
    gain = {k: round(rows[names[0]][k] - rows[names[1]][k], 2) for k in kinds} if len(names) > 1 else {}
    return {"kinds": kinds, "rows": rows, "best_lr": best_lr, "gain": gain,
            "sources": {name: r["checkpoint"] or r["encoder"] for name, r in results.items()},
            "val_count": results[names[0]].get("val_count"), "classes": results[names[0]]["classes"]}


def comparison_table(cmp: dict) -> str:
    """Markdown: one row per encoder, one column per head kind (best top-1 of its grid), then the gain."""
    names = list(cmp["rows"])
    lines = ["| encoder | " + " | ".join(f"{k} top-1" for k in cmp["kinds"]) + " |",
             "|---|" + "---|" * len(cmp["kinds"])]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{cmp['rows'][name][k]:.2f}" for k in cmp["kinds"]) + " |")
    if cmp["gain"]:
        lines.append(f"| gain ({names[0]} - {names[1]}) | "
                     + " | ".join(f"{cmp['gain'][k]:+.2f}" for k in cmp["kinds"]) + " |")
    return "\n".join(lines)


def write_comparison(results: dict[str, dict], out: str | Path, title: str = "") -> dict:
    """OUT.md (title, table, sources) and OUT.json beside it; returns the comparison."""
    cmp = compare(results)
    out = Path(out)
    sources = "\n".join(f"- {name}: {src}" for name, src in cmp["sources"].items())
    atomic_write(out.with_suffix(".md"), "\n\n".join(x for x in (title, comparison_table(cmp), sources) if x) + "\n")
    atomic_write(out.with_suffix(".json"), json.dumps(cmp, indent=1) + "\n")
    return cmp
