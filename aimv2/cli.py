"""`aimv2 <verb>`: the one command surface. Each verb lives in `aimv2.commands.<verb>`.

A verb module provides `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import io
import signal
import sys
import warnings

from aimv2.errors import UserError
from aimv2.processes import tune_cpu_allocator

# Lightning warnings that do not apply to this project's runs, silenced so real ones stand out:
# our shard stream defines __len__ per rank on purpose (every worker yields its planned batches),
# and a deprecation inside Lightning's own pytree helper.
QUIET_WARNINGS = (r".*IterableDataset.*has `__len__` defined.*", r".*LeafSpec.*is deprecated.*")

VERBS = (
    "pretrain",
    "shards",
    "demo",
    "probe",
    "visualize",
    "report",
    "export",
    "checkpoint",
    "compress",
    "ablation",
    "scaling",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimv2", description="AIMv2 pre-training toolkit")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        module = importlib.import_module(f"aimv2.commands.{verb}")
        verb_parser = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Options and `key=value` overrides in any order. argparse stops filling a positional list at the
    first option, so overrides written after options come back as unknown arguments: they are
    appended, in order, to the list a verb names with `set_defaults(_overrides=DEST)`."""
    args, extra = parser.parse_known_args(argv)
    dest = getattr(args, "_overrides", None)
    stray = [a for a in extra if dest is None or a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        setattr(args, dest, [*getattr(args, dest), *extra])
    return args


def main(argv: list[str] | None = None) -> int:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    args = parse_args(build_parser(), argv)
    # Every verb computes on the CPU somewhere (data workers at least, the whole job on CPU machines):
    # keep glibc from unmapping and re-faulting large buffers (aimv2.processes; a frozen encoder's
    # forward on the CPU measured 1.46-1.69 s -> 1.18-1.21 s per batch with it).
    tune_cpu_allocator()
    # A hung job (a rank waiting in a collective, a stuck data worker) tells where it waits:
    # `kill -USR2 PID` prints every thread's stack to stderr and the job carries on. Data workers
    # forked from it inherit the handler. SIGUSR1 is SLURM's checkpoint-and-requeue signal.
    if hasattr(signal, "SIGUSR2"):
        try:
            faulthandler.register(signal.SIGUSR2, all_threads=True)
        except (AttributeError, ValueError, io.UnsupportedOperation):  # a stderr without a file descriptor
            pass  # (a caller that captured it): no stack dumps, nothing else changes
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"aimv2 {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
