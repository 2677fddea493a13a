"""Helpers of the fault-tolerance tests (test_exact_resume, test_robustness, test_slurm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimv2.processes import Finished, run_with_deadline


def tiny_tokenizer(path: Path) -> list[str]:
    """A 6-word HF tokenizer saved to `path`, and the overrides that select it. With CLIP's 49408
    tokens the debug model's text embedding and head are 95% of its weights: checkpoints of 80 MB
    instead of 3 MB, and a third of each run's time. The tokenizer plays no part in what is tested."""
    if not (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "sample": 3, "a": 4, "digit": 5}
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
        ).save_pretrained(path)
    return ["data.tokenizer.kind=hf", f"data.tokenizer.path={path}"]


def run_or_show_stacks(cmd: list[str], *, cwd, env: dict, timeout: float) -> Finished:
    """Run an aimv2 command; one still running after `timeout` s fails the test with every process's
    thread stacks (aimv2.processes), and nothing of it outlives the test."""
    done = run_with_deadline(cmd, cwd=cwd, env=env, timeout=timeout)
    if done.hung:
        pytest.fail(
            f"still running after {timeout:.0f} s: {' '.join(map(str, cmd[:6]))} ...\n--- stdout\n"
            f"{done.stdout[-3000:]}\n--- stderr, with every process's stacks\n{done.stderr[-30000:]}",
            pytrace=False,
        )
    return done
