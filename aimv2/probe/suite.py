"""`aimv2 probe suite SUITE.yaml`: the encoder's report card. The probe on several data sets, each with its
own splits and protocol, for one or more encoders side by side (pre-trained next to its random init):
per data set and encoder, the best linear and attentive head of the probe's grid and DINO's weighted
k-NN (aimv2.probe.heads), all on one extraction of the features (cached mode).

The suite file (schema `SuiteConfig`; shipped: configs/probe/suite_offline.yaml, suite_paper.yaml):

    root: runs/demo                      # a value the paths may name as ${root}
    checkpoints:                         # name: checkpoint (names head the table's rows)
      pre-trained: ${root}/pretrain/checkpoints/last.ckpt
      random init: ${root}/pretrain/checkpoints/step=0000000.ckpt
    probe_config: toy.yaml               # the probe config every set starts from (beside the suite file)
    probe: [data.batch_size=64]          # `aimv2 probe` key=value overrides for every set
    knn: {ks: [10, 20], temperature: 0.07}
    sets:                                # in table order
      digits:
        train: ${root}/data/probe/train  # what `aimv2 probe --train/--val` take: class folders or class shards
        val: ${root}/data/probe/val
        probe: [optim.epochs=20]         # this set's own overrides

On the command line, `--checkpoint [NAME=]PATH` (repeatable) replaces `checkpoints`; a `key=value` whose key
is one of the suite's (root, checkpoints, probe_config, probe, knn, sets) overrides the suite file, any
other is an `aimv2 probe` override for every set, applied last.

Output directory (--out; default RUN/probe_suite/<suite file name> for a checkpoint in RUN/checkpoints/):
    suite.yaml                        the resolved suite: encoders and overrides included
    <encoder>/<set>/                  one `aimv2 probe` run directory (config.yaml, features/, results.*)
    <encoder>/<set>/card.json         its row of the table, kNN included; written last (atomically)
    suite.json, suite.md, suite.png   the table: data set x encoder rows, linear / attentive / kNN top-1
                                      columns and a mean row; rewritten after every set

Resuming: a (set, encoder) whose card says it finished with the same probe config, kNN settings and
checkpoint file is kept and skipped; anything else is probed (an interrupted probe itself reuses its
cached features and resumes its heads). A set that fails -- a class in val that train lacks, an empty
split, an encoder that cannot take the set's resolution -- is marked failed with its one-line reason
in the table and the JSON; the others go on, and the suite ends with a one-line error (exit status 2).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from aimv2.config import load_config, save_config
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError, check, one_line
from aimv2.fileio import atomic_file, atomic_write, markdown_table
from aimv2.probe.config import ProbeConfig
from aimv2.probe.heads import KS, TEMPERATURE

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KINDS = ("linear", "attentive")  # the table's head columns, in this order


@dataclass
class SuiteSetConfig:
    train: str = "???"  # class folders or class shards (as `aimv2 probe --train`)
    val: str = "???"  # the split the set's top-1 is measured on
    probe: list[str] = field(default_factory=list)  # this set's `aimv2 probe` key=value overrides


@dataclass
class SuiteKnnConfig:
    ks: list[int] = field(default_factory=lambda: list(KS))  # one table column per k
    temperature: float = TEMPERATURE  # neighbour weight exp(cosine similarity / temperature)

    def validate(self) -> None:
        check(
            len(self.ks) > 0 and all(k >= 1 for k in self.ks),
            "ks",
            f"must be a non-empty list of k >= 1, got {self.ks}",
        )
        check(len(set(self.ks)) == len(self.ks), "ks", "lists a k twice")
        check(self.temperature > 0, "temperature", "must be > 0")


@dataclass
class SuiteConfig:
    root: str = ""  # a directory the paths below may name as ${root}
    checkpoints: dict[str, str] = field(default_factory=dict)  # name -> checkpoint; --checkpoint replaces them
    probe_config: str = ""  # a probe config file every set starts from (relative to the suite file); "" = defaults
    probe: list[str] = field(default_factory=list)  # `aimv2 probe` key=value overrides for every set
    knn: SuiteKnnConfig = field(default_factory=SuiteKnnConfig)
    sets: dict[str, SuiteSetConfig] = field(default_factory=dict)  # name -> splits, in table order

    def validate(self) -> None:
        check(len(self.sets) > 0, "sets", "names no data set")
        bad = [name for name in self.sets if not SET_NAME.match(name)]
        check(not bad, "sets", f"names must be letters, digits, '_', '.', '-' (directory names), got {bad}")
        check_encoder_names(self.checkpoints)


SUITE_KEYS = {f.name for f in SuiteConfig.__dataclass_fields__.values()}


def check_encoder_names(checkpoints: dict[str, str]) -> None:
    slugs = [slug(name) for name in checkpoints]
    check(
        all(slugs) and len(set(slugs)) == len(slugs),
        "checkpoints",  # the suite's config key, not a run path
        f"names must differ in their letters and digits (they name directories), got {list(checkpoints)}",
    )


def slug(name: str) -> str:
    """An encoder's name as a directory name: 'random init' -> 'random_init'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(suite overrides, probe overrides for every set): by the key's first part."""
    suite, probe = [], []
    for item in items:
        key = item.split("=", 1)[0].strip().split(".", 1)[0]
        (suite if key in SUITE_KEYS else probe).append(item)
    return suite, probe


def named_checkpoints(values: list[str]) -> dict[str, str]:
    """`--checkpoint` values -> {name: path}. `NAME=PATH` names one (a NAME has no '/'; a value that is
    itself an existing path is a path, `step=0000000.ckpt` included); a bare path is named by its file:
    `last`, `step 0` (RUN/checkpoints/step=0000000.ckpt), prefixed by its run where names would repeat."""
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and "/" not in name and name.strip() and not Path(value).exists():
            pairs.append((name.strip(), path))
        else:
            pairs.append((None, value))
    auto = {path: _file_label(path) for name, path in pairs if name is None}
    repeated = {label for label in auto.values() if list(auto.values()).count(label) > 1}
    out: dict[str, str] = {}
    for name, path in pairs:
        if name is None:
            run = RunDir.of_checkpoint(path)
            name = f"{run.name}/{auto[path]}" if auto[path] in repeated and run is not None else auto[path]
        if name in out:
            raise UserError(f"--checkpoint: the name {name!r} is given twice (name them: --checkpoint NAME=PATH)")
        out[name] = path
    return out


def _file_label(path: str) -> str:
    stem = Path(path.rstrip("/")).name.removesuffix(".ckpt")
    step = re.fullmatch(r"step=(\d+)", stem)
    return f"step {int(step.group(1))}" if step else stem


# -- loading and checking the suite ---------------------------------------------------------------------------------
def load_suite(path: str | Path, overrides: list[str] = ()) -> SuiteConfig:
    """The suite file with suite overrides, validated (data sets are opened only when probed)."""
    return load_config(path, list(overrides), schema=SuiteConfig)


def probe_config_file(suite: SuiteConfig, suite_path: Path) -> Path | None:
    """The suite's probe_config: beside the suite file, else as given (a shipped `configs/probe/...` too)."""
    if not suite.probe_config:
        return None
    from aimv2.shipped import user_config

    beside = suite_path.parent / suite.probe_config
    found = beside if beside.is_file() else user_config(suite.probe_config)
    if not Path(found).is_file():
        raise UserError(
            f"{suite_path}: probe_config not found: {suite.probe_config} (looked beside the suite file too)"
        )
    return Path(found)


def set_config(
    suite: SuiteConfig, base: Path | None, name: str, checkpoint: str, run_dir: Path, extra: list[str] = ()
) -> ProbeConfig:
    """One set's probe config: the suite's probe_config <- its `probe` <- the set's `probe` <- `extra`, with
    the set's splits, the checkpoint and the run directory. Errors name the set."""
    entry = suite.sets[name]
    fixed = [
        f"checkpoint={_q(checkpoint)}",
        f"data.train={_q(entry.train)}",
        f"data.val={_q(entry.val)}",
        f"run_dir={_q(run_dir)}",
    ]
    try:
        cfg = load_config(base, [*suite.probe, *entry.probe, *extra, *fixed], schema=ProbeConfig)
    except UserError as err:
        raise UserError(f"data set '{name}': {err}") from None
    if cfg.mode != "cached":
        raise UserError(
            f"data set '{name}': mode={cfg.mode}: the suite probes features extracted once (mode=cached); "
            "run the paper's augmented protocol with `aimv2 probe` itself"
        )
    return cfg


def _q(value) -> str:
    """A value as a quoted YAML string for a key=value override (paths may hold ':', '=' or braces)."""
    return "'" + str(value).replace("'", "''") + "'"


def default_out(suite_path: Path, checkpoints: dict[str, str]) -> Path:
    first = next(iter(checkpoints.values()))
    run = RunDir.of_checkpoint(first)
    return (run.root if run is not None else Path("runs")) / "probe_suite" / suite_path.stem


# -- running ----------------------------------------------------------------------------------------------------------
def run_suite(
    path: str | Path,
    overrides: list[str] = (),
    checkpoints: list[str] = (),
    out: str | Path | None = None,
    probe_overrides: list[str] = (),
    command: str = "",
) -> dict:
    """Probe every set with every encoder (set by set), writing OUT/suite.{json,md,png} after each; returns
    the summary. Raises a one-line UserError at the end when a set failed (its reason is in the table)."""
    suite_path = Path(path)
    suite_items, probe_items = split_overrides(list(overrides))
    suite = load_suite(suite_path, suite_items)
    if checkpoints:
        suite.checkpoints = named_checkpoints(list(checkpoints))
        check_encoder_names(suite.checkpoints)
    if not suite.checkpoints:
        raise UserError(f"{suite_path}: no encoder to probe: give --checkpoint PATH (repeatable) or `checkpoints:`")
    for encoder, checkpoint in suite.checkpoints.items():
        if not Path(checkpoint).exists():
            raise UserError(f"encoder '{encoder}': checkpoint not found: {checkpoint}")
    extra = [*probe_items, *probe_overrides]
    out = Path(out) if out else default_out(suite_path, suite.checkpoints)
    base = probe_config_file(suite, suite_path)
    plan = {
        (name, encoder): set_config(suite, base, name, ckpt, out / slug(encoder) / name, extra)
        for name in suite.sets
        for encoder, ckpt in suite.checkpoints.items()
    }  # every config checked up front
    out.mkdir(parents=True, exist_ok=True)
    save_config(replace(suite, probe=[*suite.probe, *extra]), out / "suite.yaml")  # the command line's included
    cards: dict[tuple[str, str], dict] = {}
    summary: dict = {}
    for name in suite.sets:
        for encoder in suite.checkpoints:
            card = probe_card(plan[name, encoder], name, encoder, suite.knn)
            if card is None:
                return {}  # a non-zero torchrun rank: rank 0 writes the results
            cards[name, encoder] = card
            summary = write_suite(out, suite_path, suite, cards, command)
    failed = [c for c in cards.values() if c["status"] != "ok"]
    print(suite_markdown(summary))
    print(f"suite: {out / 'suite.md'}, {out / 'suite.json'} and {out / 'suite.png'}", file=sys.stderr)
    if failed:
        first = failed[0]
        raise UserError(
            f"{len(failed)} of {len(cards)} probes failed (first: {first['set']} / {first['encoder']}: "
            f"{first['error']}); the others' results are in {out / 'suite.md'}"
        )
    return summary


def _identity(path: str) -> str:
    """A checkpoint's identity for resuming: resolved path, total size and newest modification time."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
    stats = [f.stat() for f in files]
    return f"{p.resolve()}:{sum(s.st_size for s in stats)}:{int(max((s.st_mtime for s in stats), default=0))}"


def _fingerprint(cfg: ProbeConfig, knn) -> str:
    """What must match for a finished card to be kept (not how fast or where it ran)."""
    values = asdict(cfg)
    for key in ("run_dir", "progress_bar", "devices", "accelerator"):
        values.pop(key)
    values["data"].pop("num_workers")
    keys = {"probe": values, "knn": asdict(knn), "checkpoint": _identity(cfg.checkpoint)}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def probe_card(cfg: ProbeConfig, name: str, encoder: str, knn) -> dict | None:
    """One (set, encoder): kept from its card when finished the same way, else probed (heads, then kNN on
    the cached features). A failure becomes a card with status 'failed' and the one-line reason."""
    from aimv2.probe.features import pick_device
    from aimv2.probe.heads import knn_on_cache
    from aimv2.probe.run import run_probe

    run_dir = Path(cfg.run_dir)
    card_path, fp = run_dir / "card.json", _fingerprint(cfg, knn)
    base = {"set": name, "encoder": encoder, "checkpoint": cfg.checkpoint, "run_dir": str(run_dir), "fingerprint": fp}
    try:
        old = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("status") == "ok" and old.get("fingerprint") == fp:
        _say(f"{name} / {encoder}: finished before, kept ({card_path})")
        return old
    _say(f"{name} / {encoder}: probing ({cfg.checkpoint})")
    started = time.perf_counter()
    try:
        results = run_probe(cfg)
        if results is None:
            return None
        knn_started = time.perf_counter()
        features = run_dir / "features"
        scores = knn_on_cache(
            features / "train.safetensors",
            features / "val.safetensors",
            results["classes"],
            knn.ks,
            knn.temperature,
            pick_device(cfg.accelerator),
        )
        card = base | {
            "status": "ok",
            "classes": results["classes"],
            "train_count": results["train_count"],
            "val_count": results["val_count"],
            "img_size": results["img_size"],
            "selected_on": results["selected_on"],
            "heads": {
                kind: {k: row[k] for k in ("top1", "top5", "lr", "wd")}
                for kind, row in results["best_per_kind"].items()
            },
            "knn": scores,
            "knn_seconds": round(time.perf_counter() - knn_started, 2),
            "seconds": round(time.perf_counter() - started, 1),
        }
    except Exception as err:  # noqa: BLE001 - one set's failure must not lose the others' results
        if not isinstance(err, UserError):
            traceback.print_exc()
        card = base | {"status": "failed", "error": one_line(err), "seconds": round(time.perf_counter() - started, 1)}
        _say(f"{name} / {encoder}: failed: {card['error']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(card_path, json.dumps(card, indent=1) + "\n")
    return card


def _say(message: str) -> None:
    print(f"suite: {message}", file=sys.stderr, flush=True)


# -- the report card --------------------------------------------------------------------------------------------------
def columns_of(suite: SuiteConfig, cards: dict) -> list[str]:
    """linear, attentive (those some set probed), then one kNN column per k."""
    kinds = [k for k in KINDS if any(k in c.get("heads", {}) for c in cards.values())]
    return kinds + [f"kNN k={k}" for k in suite.knn.ks]


def _value(card: dict | None, column: str) -> float | None:
    if card is None or card["status"] != "ok":
        return None
    if column.startswith("kNN k="):
        found = card["knn"].get(column.removeprefix("kNN k="))
    else:
        found = card["heads"].get(column)
    return None if found is None else found["top1"]


def summarize(suite_path: Path, suite: SuiteConfig, cards: dict, command: str) -> dict:
    """The table's numbers: every card (row) and, per encoder and column, the mean over the data sets
    where every encoder has that column's number (so the encoders' means are over the same sets)."""
    encoders, sets = list(suite.checkpoints), list(suite.sets)
    columns = columns_of(suite, cards)
    mean, mean_sets = {e: {} for e in encoders}, {}
    for column in columns:
        done = [s for s in sets if all(_value(cards.get((s, e)), column) is not None for e in encoders)]
        mean_sets[column] = done
        for e in encoders:
            mean[e][column] = round(sum(_value(cards[s, e], column) for s in done) / len(done), 2) if done else None
    rows = [cards[s, e] for s in sets for e in encoders if (s, e) in cards]
    return {
        "suite": str(suite_path),
        "command": command,
        "encoders": dict(suite.checkpoints),
        "sets": sets,
        "columns": columns,
        "knn": asdict(suite.knn),
        "rows": rows,
        "mean": mean,
        "mean_sets": mean_sets,
        "pending": [f"{s} / {e}" for s in sets for e in encoders if (s, e) not in cards],
        "failed": sum(r["status"] != "ok" for r in rows),
    }


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def suite_markdown(summary: dict) -> str:
    """suite.md: the command, the table (data set x encoder; a mean row per encoder), notes and sources."""
    columns = summary["columns"]
    failed = summary["failed"] > 0
    rows = []
    for r in summary["rows"]:
        cells = [_cell(_value(r, c)) for c in columns] if r["status"] == "ok" else ["failed"] * len(columns)
        rows.append([r["set"], r["encoder"], *cells] + ([r.get("error", "")] if failed else []))
    counts = {c: len(summary["mean_sets"][c]) for c in columns}
    for encoder, means in summary["mean"].items():
        n = counts[columns[0]]
        label = f"mean ({n} set{'s' * (n != 1)})" if len(set(counts.values())) == 1 else "mean"
        rows.append([f"**{label}**", encoder, *[_cell(means[c]) for c in columns]] + ([""] if failed else []))
    table = markdown_table(["data set", "encoder", *columns] + (["note"] if failed else []), rows)
    knn = summary["knn"]
    chosen = {r.get("selected_on") for r in summary["rows"] if r["status"] == "ok"}
    lines = [f"# Report card: {Path(summary['suite']).stem}", ""]
    if summary["command"]:
        lines += ["```bash", summary["command"], "```", ""]
    lines += [
        f"Top-1 (%) on each data set's val split. linear / attentive: the best head of the probe's grid on frozen "
        f"cached features (chosen on {' or '.join(sorted(x for x in chosen if x)) or 'val'}); kNN: DINO's weighted "
        f"k-NN (cosine similarity of L2-normalised mean-pooled features, weights exp(sim / {knn['temperature']:g}), "
        f"votes summed per class) of val against train, no training. A mean is over the data sets where every "
        "encoder has that column's number.",
        "",
        table,
        "",
    ]
    if len(set(counts.values())) > 1:
        lines += ["Means over: " + ", ".join(f"{c} {n} sets" for c, n in counts.items()), ""]
    if summary["pending"]:
        lines += [f"Not yet probed: {', '.join(summary['pending'])}", ""]
    done = {r["set"]: r for r in summary["rows"] if r["status"] == "ok"}
    if done:
        lines += [
            markdown_table(
                ["data set", "classes", "chance", "train", "val", "img"],
                [
                    [s, r["classes"], f"{100 / r['classes']:.1f}", r["train_count"], r["val_count"], r["img_size"]]
                    for s, r in done.items()
                ],
            ),
            "",
        ]
    lines += ["Encoders:"] + [f"- {name}: `{path}`" for name, path in summary["encoders"].items()]
    return "\n".join(lines)


def write_suite(out: Path, suite_path: Path, suite: SuiteConfig, cards: dict, command: str) -> dict:
    """suite.json, suite.md and suite.png in `out`, each written atomically; returns the summary."""
    summary = summarize(suite_path, suite, cards, command)
    atomic_write(out / "suite.json", json.dumps(summary, indent=1) + "\n")
    atomic_write(out / "suite.md", suite_markdown(summary) + "\n")
    plot_suite(summary, out / "suite.png")
    return summary


def plot_suite(summary: dict, path: str | Path) -> None:
    """One panel per column (linear, attentive, kNN per k): a bar per encoder for every data set and the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, encoders = summary["columns"], list(summary["encoders"])
    groups = summary["sets"] + ["mean"]
    by_key = {(r["set"], r["encoder"]): r for r in summary["rows"]}
    fig, axes = plt.subplots(
        len(columns),
        1,
        figsize=(max(6.0, 1.1 * len(groups) + 2), 2.8 * len(columns)),
        squeeze=False,
        constrained_layout=True,
    )
    width = 0.8 / max(1, len(encoders))
    for ax, column in zip(axes[:, 0], columns):
        for j, encoder in enumerate(encoders):
            values = [_value(by_key.get((s, encoder)), column) for s in summary["sets"]]
            values.append(summary["mean"][encoder][column])
            xs = [i + (j - (len(encoders) - 1) / 2) * width for i in range(len(groups))]
            heights = [math.nan if v is None else v for v in values]
            ax.bar(xs, heights, width * 0.92, label=encoder, color=f"C{j}", alpha=0.85)
            for x, v in zip(xs, values):
                if v is not None:
                    ax.text(x, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize="x-small")
        for i, name in enumerate(summary["sets"]):  # chance: one over the number of classes
            classes = next((r["classes"] for r in summary["rows"] if r["set"] == name and "classes" in r), 0)
            if classes:
                ax.hlines(100 / classes, i - 0.45, i + 0.45, colors="grey", linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylabel(f"{column}\ntop-1 (%)")
        ax.set_ylim(0, 108)  # room for the value above a bar at 100
        ax.set_yticks(range(0, 101, 20))
        ax.grid(True, axis="y", alpha=0.3)
    title = f"report card: {Path(summary['suite']).stem} (val top-1 per data set; dashes: chance)"
    fig.suptitle(title, fontsize="medium")
    handles, labels = axes[0, 0].get_legend_handles_labels()  # one legend for all panels, below them
    fig.legend(handles, labels, loc="outside lower center", ncol=len(encoders), fontsize="small")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
