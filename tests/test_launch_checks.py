"""What would destroy work or hang is refused before a run starts (aimv2.engine.launch_checks): a
run_dir holding another run (unless resumed or overwritten), GPUs or FSDP/DeepSpeed where no CUDA is
visible, several nodes without a launcher. Plus the failures found by running every documented
command: a run shorter than the logging interval leaves metrics, and every compressor trains under
DDP's rule (every trainable parameter gets a gradient) with and without an instruction text."""

from pathlib import Path

import pytest
import torch

from aimv2.cli import main
from aimv2.compress.components import COMPRESSORS
from aimv2.compress.train import train
from aimv2.compress.vlm import build_attachment
from aimv2.config import TrainerConfig, load_config
from aimv2.engine.launch_checks import check_launch, claim_run_dir
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.pretraining.pretrain import pretrain
from compress_utils import compress_config, write_encoder_checkpoint
from conftest import REPO, write_caption_shards
from fault_helpers import tiny_tokenizer


def _fake_run(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run_dir: x\n")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "metrics.csv").write_text("step\n")


def test_a_fresh_run_refuses_a_run_dir_that_holds_another_run(tmp_path):
    run = tmp_path / "run"
    claim_run_dir(RunDir(run), None, False)  # nothing there yet
    _fake_run(run)
    with pytest.raises(
        UserError,
        match=r"run_dir .*run already holds a run \(config.yaml, 1 checkpoint\(s\), "
        r"logs/metrics.csv\): continue it with trainer.resume=auto",
    ):
        claim_run_dir(RunDir(run), None, False)
    with pytest.raises(UserError, match="already holds a run"):
        claim_run_dir(RunDir(run), "none", False)
    claim_run_dir(RunDir(run), "auto", False)  # resuming it is what the run dir is for
    claim_run_dir(RunDir(run), str(run / "checkpoints/last.ckpt"), False)
    assert (run / "checkpoints/last.ckpt").exists()


def test_overwrite_removes_the_old_runs_artefacts_and_keeps_the_rest(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(run)
    (run / "probe").mkdir()  # another verb's output, not the run's
    claim_run_dir(RunDir(run), None, True)
    assert sorted(p.name for p in run.iterdir()) == ["probe"]
    assert "trainer.overwrite=true: removed the previous run" in capsys.readouterr().out


def test_only_the_launching_process_checks(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fake_run(run)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child started after rank 0 wrote config.yaml
    claim_run_dir(RunDir(run), None, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA refuses")
@pytest.mark.parametrize(
    "fields,match",
    [
        (
            {"accelerator": "gpu"},
            r"'trainer.accelerator': gpu asked for, but no CUDA GPU is visible here; check the "
            r"config on this machine with --rehearse",
        ),
        ({"strategy": "fsdp"}, r"'trainer.strategy': fsdp needs CUDA GPUs and none is visible here"),
        ({"strategy": "deepspeed"}, r"'trainer.strategy': deepspeed needs CUDA GPUs"),
        (
            {"num_nodes": 32, "accelerator": "cpu"},
            r"'trainer.num_nodes': 32 nodes need a launcher that starts the other "
            r"nodes' processes \(sbatch launch/slurm_multinode.sbatch",
        ),
    ],
)
def test_launches_that_cannot_start_here_are_one_line_errors(fields, match, monkeypatch):
    for key in ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match=match):
        check_launch(TrainerConfig(**fields))
    check_launch(TrainerConfig(accelerator="cpu", devices=2, strategy="ddp"))


def test_a_launcher_brings_the_other_nodes(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    check_launch(TrainerConfig(num_nodes=4, accelerator="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA refuses")
def test_the_gpu_compress_config_says_it_needs_gpus(capsys):
    code = main(
        [
            "compress",
            "train",
            str(REPO / "configs/compress/finetune_stage2.yaml"),
            "encoder.source=x.ckpt",
            "data.train=x.tar",
            "lm.path=x",
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "aimv2 compress: error: config key 'trainer.strategy': fsdp needs CUDA "
        "GPUs and none is visible here; check the config on this machine with "
        "--rehearse"
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_caption_shards(tmp_path_factory.mktemp("launch") / "shards", n=16, per_shard=16)


def test_runs_shorter_than_the_logging_interval_leave_metrics(tmp_path, shards, capsys):
    cfg = load_config(
        REPO / "configs/pretrain/debug.yaml",
        [
            f"run_dir={tmp_path / 'pre'}",
            f"data.sources=[{{urls: '{shards.urls}'}}]",
            "model.img_size=28",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.tokenizer.max_length=8",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=10",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
        ],
    )
    pretrain(cfg)
    assert main(["report", str(tmp_path / "pre")]) == 0  # the command the run's summary suggests
    encoder = write_encoder_checkpoint(tmp_path / "enc.ckpt", img_size=28)
    train(
        compress_config(
            tmp_path / "c",
            encoder,
            shards.urls,
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=10",
            "compressor.kind=pool",
            "compressor.num_tokens=1",
        )
    )
    out = capsys.readouterr().out
    assert "finished after 2 steps" in out and "caption loss" in out and "no caption loss logged" not in out


@pytest.mark.parametrize("prompt", ["", "Caption:"])
@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_every_compressor_gives_every_trainable_parameter_a_gradient(kind, prompt, tmp_path):
    """DDP (find_unused_parameters=False) stops on a trainable parameter without a gradient: QueCC's text
    path with no instruction text and a tokenizer without BOS (Qwen2's) did that."""
    encoder = write_encoder_checkpoint(tmp_path / "enc.ckpt", img_size=56)
    words = tiny_tokenizer(tmp_path / "tok")
    cfg = compress_config(
        tmp_path,
        encoder,
        "unused.tar",
        f"compressor.kind={kind}",
        f"compressor.num_tokens={0 if kind == 'mlp' else 4}",
        "compressor.hidden=16",
        f"text.prompt='{prompt}'",
        "text.tokenizer.kind=hf",
        f"text.tokenizer.path={words[1].split('=', 1)[1]}",
    )
    vlm, tokenizer = build_attachment(cfg.stage, cfg.encoder, cfg.compressor, cfg.lm, cfg.text)
    assert tokenizer.bos_id is None  # nothing precedes the image unless the prompt does
    vlm.train()
    images = torch.randn(2, 3, 56, 56)
    captions = torch.tensor([[3, 4, 5], [4, 5, 1]])
    ce, _ = vlm.caption_loss(images, captions, torch.ones_like(captions, dtype=torch.bool))
    ce.backward()
    missing = [name for name, p in vlm.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    if kind == "quecc":
        assert any(p.requires_grad for p in vlm.compressor.text_parameters()) == bool(prompt)
