"""`aimv2 --help` and every verb's and sub-verb's `--help` answer without importing torch.

A user's first contact is `--help`; with torch imported it took 2.7-3.6 s, without it about 0.1 s. The
command modules import their heavy dependencies inside `run()`; this holds them to it, in a fresh
interpreter (this test process has torch loaded already)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# Runs every help in one interpreter: after each, the exit status and whether torch (or another heavy
# dependency) has been imported so far.
PROBE = r"""
import argparse, contextlib, io, json, sys
from aimv2 import cli

def helps():
    yield []
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb, verb_parser in verbs.choices.items():
        yield [verb]
        for action in verb_parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ([verb, sub] for sub in action.choices)

results = []
for words in helps():
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = cli.main([*words, "--help"])
        except SystemExit as stop:
            code = stop.code
    heavy = [m for m in ("torch", "lightning", "timm", "webdataset", "numpy") if m in sys.modules]
    results.append({"argv": words, "code": code, "heavy": heavy, "chars": len(out.getvalue())})
print(json.dumps(results))
"""


def test_every_help_answers_without_torch():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    argvs = [r["argv"] for r in results]
    # The verbs and their sub-verbs are all there (a probe that found nothing would prove nothing).
    assert {"pretrain", "demo", "probe", "shards", "compress", "export", "visualize", "report", "ablation"} <= {
        a[0] for a in argvs if a
    }
    assert {("compress", s) for s in ("train", "evaluate", "plan", "export")} <= {tuple(a) for a in argvs}
    assert {("shards", s) for s in ("captions", "classes", "demo", "scenes")} <= {tuple(a) for a in argvs}
    for r in results:
        assert r["code"] == 0 and r["chars"] > 0, f"aimv2 {' '.join(r['argv'])} --help: exit {r['code']}"
        assert r["heavy"] == [], f"aimv2 {' '.join(r['argv'])} --help imported {r['heavy']}"
