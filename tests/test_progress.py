"""Progress output: whole lines with rate and ETA when the output is not a terminal (CI, SLURM logs),
never a carriage return; checked on the line printer itself and on real piped runs of
`aimv2 pretrain` and `aimv2 shards`."""

import io
import json
import os
import re
import subprocess
import sys

import pytest

from aimv2.progress import LineProgress, format_duration, progress, progress_mode
from conftest import jpeg_bytes
from viz_runs import STEPS, short_runs


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv("AIMV2_PROGRESS", raising=False)
    assert progress_mode(io.StringIO()) == "lines" and progress_mode(FakeTerminal()) == "bar"
    assert progress_mode(FakeTerminal(), enable=False) == "off"
    monkeypatch.setenv("AIMV2_PROGRESS", "lines")
    assert progress_mode(FakeTerminal()) == "lines"
    assert isinstance(progress(total=3, stream=FakeTerminal()), LineProgress)


def test_line_progress_prints_rate_and_eta_lines(monkeypatch):
    clock = iter(range(0, 1000, 2))  # every call to perf_counter advances 2 s
    monkeypatch.setattr("aimv2.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = LineProgress(total=300, desc="features train", unit="img", stream=out, interval=1e9)
    for _ in range(10):
        bar.update(30)  # every 10% prints a line
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[3] == "features train: 120/300 (40%) 15 img/s ETA 0:12"  # 30 images in 2 s; 180 left
    assert lines[-1].startswith("features train: 300/300 ") and lines[-1].endswith("done in 0:22")
    assert format_duration(3725) == "1:02:05"


@pytest.mark.slow
def test_piped_pretrain_prints_lines_and_a_summary_without_carriage_returns(tmp_path_factory):
    runs = short_runs(tmp_path_factory)
    assert runs["a_returncode"] == 0, runs["a_output"][-3000:]
    output = runs["a_output"]
    assert "\r" not in output
    assert re.search(r"^train: \d+/6 \(\d+%\) .* ETA \d+:\d\d loss=", output, re.M)
    assert re.search(rf"^train: {STEPS}/{STEPS} .*done in", output, re.M)
    summary = runs["a_stdout"]
    for where in ("checkpoints", "metrics", "predictions", "report"):
        assert re.search(rf"^  {where} +\S", summary, re.M), where
    assert f"aimv2 report {runs['a']}" in summary


def test_piped_shard_writing_prints_lines_without_carriage_returns(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(25):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 16))
        lines.append(json.dumps({"image": f"{i}.jpg", "caption": f"picture {i}"}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMV2_PROGRESS")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aimv2",
            "shards",
            "captions",
            "--images",
            str(tmp_path / "img"),
            "--captions",
            str(tmp_path / "c.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--samples-per-shard",
            "10",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    assert re.search(r"^shards out: 25/25 .*done in \d+:\d\d shards=3 skipped=0$", proc.stderr, re.M), proc.stderr
    assert "wrote 25 samples in 3 shards" in proc.stdout


@pytest.mark.parametrize("total", [None, 0])
def test_unknown_totals_print_counts_and_rate(total):
    out = io.StringIO()
    bar = LineProgress(total=total, desc="x", stream=out, interval=0)
    bar.update(5)
    bar.close()
    assert re.fullmatch(r"x: 5 it \S+ \S+\nx: 5 it \S+ \S+, done in 0:00\n", out.getvalue())
