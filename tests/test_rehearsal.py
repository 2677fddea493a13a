"""The rehearsal (`--rehearse`): a config run as it is -- its strategy, bf16 autocast, clipping,
accumulation, checkpointing, data mixture shape -- shrunk to the debug size on the CPU for 2 steps,
checkpointed after step 1 and resumed from there. Every shipped config and preset is rehearsed through
the documented commands (tests/test_documented_commands.py); here: that each is documented, the CLI on
two real DDP ranks, what the CPU can check of FSDP and DeepSpeed (their Lightning objects, precision
plugins, a real ZeRO step whose checkpoint reads back), and that a crash is reported, not raised."""

import os
import sys
from dataclasses import replace

import pytest

from aimv2.config import load_config
from aimv2.engine.rehearsal import RehearsalReport, check_gpu_strategy, shrink_trainer
from aimv2.pretraining.rehearse import rehearse_pretrain
from conftest import REPO
from doc_commands import documented_commands
from fault_helpers import run_or_show_stacks

PRETRAIN = sorted((REPO / "configs/pretrain").glob("*.yaml"))
COMPRESS = sorted((REPO / "configs/compress").glob("*.yaml"))
PRESETS = sorted((REPO / "configs/strategy").glob("*.yaml"))
# All four presets run through the documented commands' rehearsals. deepspeed_zero3 takes one real DeepSpeed
# step in a subprocess (7 s on 2 cores, 30 s under load): slow.
GPU_PRESETS = ["fsdp", pytest.param("deepspeed_zero3", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("rehearse")  # the demo shards are written once and shared


def _passed(report: RehearsalReport, *areas: str) -> dict[str, list[str]]:
    assert not report.failed, report.table()
    by_area: dict[str, list[str]] = {}
    for f in report.findings:
        by_area.setdefault(f.area, []).append(f"{f.status}: {f.detail}")
    for area in areas:
        assert area in by_area, report.table()
    return by_area


def test_every_shipped_config_and_preset_has_a_documented_command_that_runs_it():
    """tests/test_documented_commands.py rehearses (or runs) every command the docs give; every shipped
    config must be among them, so each one is rehearsed in CI."""
    texts = [c.text for c in documented_commands()]
    for config in PRETRAIN + COMPRESS:
        assert any(str(config.relative_to(REPO)) in t for t in texts), f"no documented command runs {config.name}"
    for preset in PRESETS:
        assert any(f"--strategy {preset.stem}" in t or f"STRATEGY={preset.stem} " in t for t in texts), preset.name


@pytest.mark.slow
def test_the_cli_rehearses_a_paper_recipe_on_two_ddp_ranks(tmp_path):
    """The command docs/scale-out.md gives, as a user runs it: 2 CPU ranks of DDP in bf16 with clipping and
    the fused AdamW (the step-1 crash of every paper recipe before), a checkpoint, a resume."""
    env = os.environ | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = run_or_show_stacks(
        [
            sys.executable,
            "-m",
            "aimv2",
            "pretrain",
            str(REPO / "configs/pretrain/aimv2_large_224.yaml"),
            "--rehearse",
            "--rehearse-dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 node x 2 CPU process(es) (ddp, gloo)" in done.stdout
    assert (
        "resume      ok       from step=0000001.ckpt to step 2: weights equal the uninterrupted run's bit for bit"
        in done.stdout
    )
    assert done.stdout.rstrip().splitlines()[-1].startswith("rehearsal passed")
    log = (tmp_path / "aimv2_large_224" / "phase1.log").read_text()
    assert "MEMBER: 2/2" in log  # two real ranks


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_only_presets_are_checked_as_far_as_the_cpu_allows(preset, tmp_path):
    cfg = load_config([REPO / "configs/pretrain/aimv2_large_224.yaml", REPO / f"configs/strategy/{preset}.yaml"])
    report = RehearsalReport(preset)
    check_gpu_strategy(cfg.trainer, report, tmp_path, grad_clip=1.0)
    found = _passed(report)
    kind = "fsdp" if preset == "fsdp" else "deepspeed"
    statuses = [line.split(":")[0] for line in found[kind]]
    assert "checked" in statuses and statuses[-1] == "not run"  # what only a GPU shows is said, not hidden
    if kind == "deepspeed":
        assert any(
            f"ZeRO-{cfg.trainer.zero_stage}: one DeepSpeed step on the CPU" in line and "equals" in line
            for line in found[kind]
        )
    trainer = shrink_trainer(cfg.trainer, 2, None, report)
    assert (trainer.strategy, trainer.devices, trainer.num_nodes, trainer.accelerator) == ("ddp", 2, 1, "cpu")
    assert trainer.precision == "bf16-mixed" and trainer.checkpoint_every_n_steps == 1


@pytest.mark.parametrize("name", ["demo", "ablation"])
def test_a_word_list_tokenizer_that_is_not_here_has_a_stand_in(name, demo_root, tmp_path, monkeypatch):
    """The demo's and the ablation's configs name a word list their command writes (runs/.../vocab.txt):
    rehearsed where it is absent, the demo set's list stands in with the demo shards, and it says so."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / f"configs/pretrain/{name}.yaml")
    report = rehearse_pretrain(cfg, tmp_path / "r", devices=1, demo_root=demo_root, in_process=True)
    tokenizer = _passed(report, "train", "resume")["tokenizer"]
    assert tokenizer == [
        f"changed: data.tokenizer.path: word list {cfg.data.tokenizer.path!r} is not here: the "
        f"demo set's word list {demo_root / 'demo_data' / 'vocab.txt'} stands in (the real run "
        "needs its list)"
    ]


def test_a_crash_is_reported_not_raised(demo_root):
    cfg = load_config(REPO / "configs/pretrain/debug.yaml")
    broken = replace(cfg, optim=replace(cfg.optim, betas=[0.9, 1.5]))  # AdamW refuses beta2 >= 1 at step 0
    report = rehearse_pretrain(broken, demo_root / "broken", devices=1, demo_root=demo_root, in_process=True)
    assert report.failed
    failed = [f for f in report.findings if f.status == "FAILED"]
    assert failed[0].area == "train" and "beta" in failed[0].detail and "traceback:" in failed[0].detail
    assert report.table().endswith("FAILED: fix the lines marked FAILED before submitting")


def test_a_resumed_compress_run_equals_the_uninterrupted_one_bit_for_bit(demo_root):
    """Compressor alignment resumes its data stream exactly, as pre-training does: the rehearsal's
    phase 2 starts a fresh process state from the step-1 checkpoint and must end with phase 1's weights."""
    from aimv2.compress.config import CompressConfig
    from aimv2.compress.rehearse import rehearse_compress

    cfg = load_config(REPO / "configs/compress/tiny.yaml", schema=CompressConfig)
    report = rehearse_compress(cfg, demo_root / "compress", devices=1, demo_root=demo_root, in_process=True)
    found = _passed(report, "resume")
    assert found["resume"] == [
        "ok: from step=0000001.ckpt to step 2: weights equal the uninterrupted run's bit for bit"
    ]
