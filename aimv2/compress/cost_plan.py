"""`aimv2 compress plan`: what each number of visual tokens M costs at prefill, by the formula and
measured on this machine, with and without a cached text prefix.

- FLOPs: 2 * N_params * (Q + M) per image ("Inference Optimal VLMs Need Only One Visual Token but
  Larger Models"); N_params is the given LLM size, or the attached LM's (without its input
  embedding table). With the Q text tokens cached, 2 * N_params * M.
- Latency: one prefill of the attached LM (the config's `lm` section) over Q text + M visual
  positions, against a prefill of the M visual positions on top of the text's cached KV.
  The cached layout puts the text before the image (`text.prefix`, the query-first layout):
  with the image first, text after it cannot be reused across images (aimv2/compress/vlm.py).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aimv2.compress.components import build_lm, keep_last_logits, prefill_flops, prefill_params, with_cache
from aimv2.compress.config import LMSection, TextSection
from aimv2.compress.vlm import build_prefix, build_text_tokenizer
from aimv2.errors import UserError
from aimv2.fileio import atomic_write, markdown_table


@dataclass
class PlanRow:
    num_tokens: int  # M
    text_tokens: int  # Q
    params: float  # N_params used in the formula
    gflops: float  # 2 N (Q + M) / 1e9
    gflops_cached: float  # 2 N M / 1e9: the text's KV comes from the cache
    ms: float  # measured prefill of Q + M positions (median)
    ms_cached: float  # measured prefill of M positions on the cached text (median, cache expansion included)

    @property
    def saving(self) -> float:
        return 1.0 - self.ms_cached / self.ms if self.ms > 0 else 0.0


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def plan(
    lm_cfg: LMSection,
    text: TextSection,
    text_tokens: int,
    num_tokens: list[int],
    params: float | None = None,
    repeats: int = 5,
    device: str = "cpu",
) -> tuple[list[PlanRow], dict]:
    """Rows per M and facts about the measurement (attached LM size, cache build time, device)."""
    if text_tokens < 1 or not num_tokens or min(num_tokens) < 1:
        raise UserError("plan needs --text-tokens >= 1 and a list of M >= 1 (e.g. --tokens 1,4,16,64)")
    tokenizer = build_text_tokenizer(text)
    lm = build_lm(lm_cfg, tokenizer.vocab_size).to(device)
    attached = prefill_params(lm)
    n = float(params) if params else float(attached)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, tokenizer.vocab_size, (text_tokens,), generator=g).to(device)  # (Q,)
    text_embeds = lm.get_input_embeddings()(text)[None]  # (1, Q, D)
    build_prefix(lm, text)  # warm-up: first calls pay one-time allocation costs
    start = time.perf_counter()
    prefix = build_prefix(lm, text)
    build_ms = (time.perf_counter() - start) * 1e3
    keep = keep_last_logits(lm, 1)
    rows = []
    for m in num_tokens:
        visual = (torch.randn(1, m, text_embeds.shape[-1], generator=g) * 0.02).to(
            device, text_embeds.dtype
        )  # (1, M, D)
        full = torch.cat([text_embeds, visual], dim=1)

        # timed right here, in this iteration: the defaults bind this M's tensors
        def uncached(full=full):
            lm(inputs_embeds=full, use_cache=True, **keep)

        def cached(m=m, visual=visual):
            mask = torch.ones(1, text_tokens + m, dtype=torch.long, device=device)
            lm(inputs_embeds=visual, attention_mask=mask, use_cache=True, **with_cache(lm, prefix.for_batch(1)), **keep)

        rows.append(
            PlanRow(
                m,
                text_tokens,
                n,
                prefill_flops(n, text_tokens, m) / 1e9,
                prefill_flops(n, 0, m) / 1e9,
                _median_ms(uncached, repeats),
                _median_ms(cached, repeats),
            )
        )
    facts = {
        "attached_lm_params": attached,
        "params_used": n,
        "device": str(device),
        "repeats": repeats,
        "prefix_cache_build_ms": build_ms,
        "lm": lm_cfg.path or f"random {lm_cfg.arch} (hidden {lm_cfg.hidden_size}, {lm_cfg.num_layers} layers)",
    }
    return rows, facts


def plan_markdown(rows: list[PlanRow], facts: dict) -> str:
    """plan.md: the facts of the measurement, then one table row per M."""
    header = [
        "M",
        "Q",
        "GFLOPs (no cache)",
        "GFLOPs (cached text)",
        "ms (no cache)",
        "ms (cached text)",
        "latency saved",
    ]
    table = [
        [
            r.num_tokens,
            r.text_tokens,
            f"{r.gflops:.4g}",
            f"{r.gflops_cached:.4g}",
            f"{r.ms:.2f}",
            f"{r.ms_cached:.2f}",
            f"{100 * r.saving:.0f}%",
        ]
        for r in rows
    ]
    lines = [
        f"prefill per image; FLOPs for N_params = {facts['params_used']:.4g}; latency of the attached LM "
        f"({facts['lm']}, N_params = {facts['attached_lm_params']:,}) on {facts['device']}, median of "
        f"{facts['repeats']}; building the text cache once took {facts['prefix_cache_build_ms']:.1f} ms",
        "",
        markdown_table(header, table),
    ]
    return "\n".join(lines) + "\n"


def write_plan(rows: list[PlanRow], facts: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"facts": facts, "rows": [asdict(r) | {"saving": r.saving} for r in rows]}
    atomic_write(out / "plan.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(out / "plan.md", plan_markdown(rows, facts))
