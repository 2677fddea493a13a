"""`aimv2 compress evaluate`: caption loss and perplexity on held-out shards for each trained
attachment and each M, with the prefill cost of each M, as a table (Markdown + JSON) and a plot.

Compressors whose weights do not depend on M (pool, kdv) are evaluated at every M asked for from
one checkpoint; the others at the M they were trained for (one run per M: eval/README.md).
Prefill FLOPs per image follow 2 * N_params * (Q + M), Q = the text tokens of an average sample
(prefix + prompt + caption). With `shuffled=True` every M is scored a second time with each
caption paired to another image of its batch: the gap to the matched score is what the visual
tokens tell the LM about their own image (a text-only or prior-only model shows no gap).

The evaluation plot: caption loss against the number of visual tokens M, and against the
prefill FLOPs per image, one line per run (matplotlib, headless).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aimv2.checkpoints import schema
from aimv2.compress.components import prefill_flops, prefill_params
from aimv2.compress.module import CompressModule, held_out_loader, load_module
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.fileio import atomic_write, markdown_table


@dataclass
class EvalRow:
    run: str  # the checkpoint
    compressor: str
    stage: int
    num_tokens: int  # M
    loss: float  # mean caption cross-entropy per token (nats)
    perplexity: float
    caption_tokens: int  # tokens scored
    images: int
    skipped: int  # corrupt held-out samples skipped
    text_tokens: float  # Q: prefix + prompt + mean caption tokens per sample
    lm_params: int  # N_params of the formula (LM without its input embedding table)
    prefill_gflops: float  # 2 * N_params * (Q + M) / 1e9, per image
    shuffled: bool = False  # captions scored against another image of their batch (a control)
    token_error: float = float("nan")  # 1 - greedy next-token accuracy on caption tokens: an error in [0, 1]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run directory (its checkpoints/last.ckpt)."""
    p = Path(path)
    if p.is_dir():
        p = RunDir(p).last_checkpoint
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p} (give a .ckpt or a run directory of `aimv2 compress train`)")
    return str(p)


def trained_val_shards(checkpoint: str) -> str:
    """The held-out shards (data.val) of the run that trained `checkpoint`: its RUN/config.yaml, or the
    whole config that checkpoints written before the module received sections held; "" when unknown."""
    run = RunDir.of_checkpoint(checkpoint)
    if run is not None and run.config.is_file():
        from omegaconf import OmegaConf

        return str(OmegaConf.load(run.config).get("data", {}).get("val", "") or "")
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return str(schema.hyper_parameters(raw).get("config", {}).get("data", {}).get("val", "") or "")


@torch.no_grad()
def score(module: CompressModule, loader, max_batches: int = 0, shuffled: bool = False) -> dict:
    """Summed caption cross-entropy over the held-out batches at the compressor's current M
    (shuffled: each caption against the next image of its batch)."""
    vlm, device = module.vlm, module.device
    total, tokens, correct, images, skipped = 0.0, 0, 0, 0, 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        skipped += int(batch["skipped"])
        if batch["image"].shape[0] == 0:  # corrupt samples only: their count is all it carries
            continue
        pixels = batch["image"].roll(1, dims=0) if shuffled else batch["image"]
        ce, n, hits = vlm.caption_loss(
            pixels.to(device), batch["tokens"].to(device), batch["token_mask"].to(device), count_correct=True
        )
        total, tokens, correct = total + float(ce), tokens + int(n), correct + int(hits)
        images += batch["image"].shape[0]
    if tokens == 0:
        raise UserError("no held-out caption was scored (empty or unreadable shards)")
    return {"sum": total, "tokens": tokens, "correct": correct, "images": images, "skipped": skipped}


def evaluate_checkpoint(
    path: str,
    val: str = "",
    num_tokens: list[int] = (),
    batch_size: int = 32,
    num_workers: int = 2,
    max_batches: int = 0,
    device: str = "cpu",
    shuffled: bool = False,
) -> list[EvalRow]:
    module = load_module(path).to(device)
    vlm = module.vlm
    trained = vlm.compressor.num_tokens
    values = list(num_tokens) if num_tokens and vlm.compressor.flexible else [trained]
    key = "--val" if val else "data.val"
    val = val or trained_val_shards(path)
    n_params = prefill_params(vlm.lm)
    rows = []
    for m in values:
        if m != vlm.compressor.num_tokens:
            vlm.compressor.set_num_tokens(m)
        for control in (False, True) if shuffled else (False,):
            loader = held_out_loader(val, key, module.tokenizer, vlm.preprocessing, batch_size, num_workers)
            s = score(module, loader, max_batches, shuffled=control)
            q = vlm.prefix_ids.numel() + vlm.prompt_ids.numel() + s["tokens"] / s["images"]
            loss = s["sum"] / s["tokens"]
            rows.append(
                EvalRow(
                    path,
                    module.compressor_cfg.kind,
                    module.stage,
                    m,
                    loss,
                    math.exp(min(loss, 700)),
                    s["tokens"],
                    s["images"],
                    s["skipped"],
                    q,
                    n_params,
                    prefill_flops(n_params, q, m) / 1e9,
                    control,
                    1.0 - s["correct"] / s["tokens"],
                )
            )
    return rows


def evaluation_markdown(rows: list[EvalRow]) -> str:
    """results.md: one table row per checkpoint, M and control (matched or shuffled images)."""
    header = [
        "run",
        "compressor",
        "stage",
        "M",
        "images",
        "caption loss",
        "perplexity",
        "token error",
        "Q (text tokens)",
        "prefill GFLOPs / image",
        "images scored",
    ]
    return (
        markdown_table(
            header,
            [
                [
                    RunDir.label_of(r.run),
                    r.compressor,
                    r.stage,
                    r.num_tokens,
                    "shuffled" if r.shuffled else "matched",
                    f"{r.loss:.4f}",
                    f"{r.perplexity:.2f}",
                    f"{r.token_error:.4f}",
                    f"{r.text_tokens:.1f}",
                    f"{r.prefill_gflops:.4g}",
                    r.images,
                ]
                for r in rows
            ],
        )
        + "\n"
    )


def evaluate(checkpoints: list[str], out_dir: str | Path, **kwargs) -> list[EvalRow]:
    """Evaluate every checkpoint (or run dir); write results.{json,md} and loss_vs_tokens.png to out_dir."""
    rows = [row for ckpt in checkpoints for row in evaluate_checkpoint(resolve_checkpoint(ckpt), **kwargs)]
    out = RunDir(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    atomic_write(out.results_json, json.dumps({"rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    atomic_write(out.results_md, evaluation_markdown(rows))

    plot_loss_vs_tokens(rows, out.root / "loss_vs_tokens.png")
    return rows


def plot_loss_vs_tokens(rows, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aimv2.engine.run_dir import RunDir
    from aimv2.fileio import atomic_file

    series: dict[str, list] = defaultdict(list)
    for r in rows:
        control = ", images shuffled" if r.shuffled else ""
        series[f"{r.compressor} (stage {r.stage}) {RunDir.label_of(r.run)}{control}"].append(r)
    fig, (ax_m, ax_f) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, points in series.items():
        points = sorted(points, key=lambda r: r.num_tokens)
        loss = [r.loss for r in points]
        style = "--" if points[0].shuffled else "-"
        ax_m.plot([r.num_tokens for r in points], loss, style, marker="o", label=label)
        ax_f.plot([r.prefill_gflops for r in points], loss, style, marker="o", label=label)
    ax_m.set_xscale("log", base=2)
    ax_m.set_xlabel("visual tokens M")
    ax_f.set_xscale("log")
    ax_f.set_xlabel("prefill GFLOPs per image, 2 N (Q + M)")
    for ax in (ax_m, ax_f):
        ax.set_ylabel("held-out caption loss (nats / token)")
        ax.grid(True, alpha=0.3)
    ax_m.legend(fontsize="small")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
