"""FSDP2 sharded checkpoints on the CPU, with real processes: torch 2.14's `fully_shard` takes a CPU
device mesh with gloo, so 2 processes shard the debug-size model (aimv2.engine.trainer.shard_model),
take an optimizer step and write a torch.distributed.checkpoint directory in the project's layout
(aimv2.checkpoints.dcp.save_dcp_checkpoint, what the fsdp2 strategy calls). Then:

- 1 and 3 processes load it back the way Lightning's ModelParallelStrategy resumes (its own
  `_load_checkpoint`) and every weight and optimizer state equals the originals exactly;
- `load_encoder`, the probe's loader and `aimv2 export` read the directory; the encoder's features
  equal those of the model as it was saved (torch.equal);
- `aimv2 checkpoint convert` makes one file that `load_encoder` and a plain torch optimizer read;
- a DCP directory without its `.metadata` (a killed save) is a one-line error naming it, resume
  passes over it, and a save that fails leaves nothing under the checkpoint's name.

The processes are started like torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), running this
file as a script. The Lightning end-to-end run (train 2 processes, resume at 1) is in
test_fsdp2_lightning.py."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

IMG, VOCAB, TEXT = 28, 64, 8
HPARAMS = {"model": {"size": "debug", "img_size": IMG, "native": False}, "vocab_size": VOCAB, "max_text_len": TEXT}


# -- the worker: run as `python test_fsdp2_checkpoints.py save|load DIR` in each process --------------
def _build(seed: int):
    """The pre-training LightningModule at the debug size (state dict keys `model.encoder.*`)."""
    from aimv2.pretraining.module import AIMv2PretrainModule

    torch.manual_seed(seed)
    return AIMv2PretrainModule(HPARAMS["model"], {}, {}, vocab_size=VOCAB, max_text_len=TEXT)


def _shard(module):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from aimv2.engine.optim import build_optimizer
    from aimv2.engine.trainer import shard_model

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    shard_model(module.model, mesh)
    return build_optimizer(module.model, 1e-3, 1e-4, (0.9, 0.95), 1e-8, fused=False)


def _full_state(module, optimizer) -> dict:
    """Every rank's shards gathered into full tensors (collective), for exact comparisons."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(module, options=options),
        "optim": get_optimizer_state_dict(module, optimizer, options=options),
    }


def _worker(mode: str, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "save":
        module = _build(seed=0)
        optimizer = _shard(module)
        generator = torch.Generator().manual_seed(1)  # the same batch on every rank
        images = torch.randn(2, 3, IMG, IMG, generator=generator)
        tokens = torch.randint(0, VOCAB, (2, TEXT), generator=generator)
        pixels, logits = module.model(images, tokens, torch.tensor([1, 2]))
        (pixels.square().mean() + logits.float().logsumexp(-1).mean()).backward()
        optimizer.step()  # optimizer states exist, weights moved from their init
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from aimv2.checkpoints.dcp import save_dcp_checkpoint

        state = {"state_dict": get_model_state_dict(module), "optimizer_0": get_optimizer_state_dict(module, optimizer)}
        meta = {"global_step": 1, "hyper_parameters": HPARAMS, "epoch": 0}
        save_dcp_checkpoint(state, meta, out / "step=0000001.ckpt", rank, dist.barrier)
        full = _full_state(module, optimizer)
        if rank == 0:
            torch.save(full, out / "reference.pt")
    else:  # load at this world size, as Lightning's ModelParallelStrategy resumes
        from lightning.fabric.strategies.model_parallel import _load_checkpoint

        module = _build(seed=123)  # other weights: everything must come from the checkpoint
        optimizer = _shard(module)
        meta = _load_checkpoint(
            out / "step=0000001.ckpt", {"state_dict": module, "optimizer_0": optimizer}, optimizer_states_from_list=True
        )
        full = _full_state(module, optimizer)
        if rank == 0:
            torch.save({**full, "meta_step": meta.get("global_step")}, out / f"loaded_{dist.get_world_size()}.pt")
    dist.destroy_process_group()


# -- the tests ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(mode: str, out: Path, world: int) -> None:
    """`world` processes started the way torchrun starts them; all must succeed."""
    port = _free_port()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, mode, str(out)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} of {world} ({mode}) failed:\n{text[-3000:]}"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    run_ranks("save", out, world=2)
    return out, out / "step=0000001.ckpt", torch.load(out / "reference.pt", weights_only=True)


def _features(encoder, images):
    with torch.no_grad():
        return encoder.forward_features(images)


def _reference_encoder(reference):
    """The saved model's encoder as a plain single-process module (its gathered weights)."""
    from aimv2.checkpoints.convert import module_to_timm
    from aimv2.models.encoder import build_encoder
    from aimv2.models.sizes import get_size

    encoder = build_encoder(get_size("debug"), IMG)
    encoder.load_state_dict(module_to_timm(reference["model"]), strict=True)
    return encoder.eval()


@pytest.mark.slow
def test_two_processes_write_a_complete_dcp_directory_in_lightnings_layout(written):
    from aimv2.checkpoints import detect_format
    from aimv2.checkpoints.dcp import top_level_keys

    out, ckpt, _ = written
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert top_level_keys(ckpt) == ["optimizer_0", "state_dict"]
    assert detect_format(ckpt) == "dcp"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the temporary was renamed away


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_another_world_size_loads_every_tensor_exactly(written, world):
    out, _, reference = written
    run_ranks("load", out, world=world)
    loaded = torch.load(out / f"loaded_{world}.pt", weights_only=True)
    assert loaded["meta_step"] == 1
    assert set(loaded["model"]) == set(reference["model"]) and len(reference["model"]) > 40
    for key, value in reference["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    states = reference["optim"]["state"]
    assert states and set(loaded["optim"]["state"]) == set(states)
    for name, state in states.items():
        for key, value in state.items():
            assert torch.equal(loaded["optim"]["state"][name][key], value), (name, key)
    assert loaded["optim"]["param_groups"] == reference["optim"]["param_groups"]


@pytest.mark.slow
def test_load_encoder_reads_the_directory_with_the_saved_models_features(written):
    from aimv2 import load_encoder
    from aimv2.checkpoints import load_checkpoint
    from aimv2.checkpoints.loading import read_decoder

    _, ckpt, reference = written
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))
    encoder, preprocessing = load_encoder(ckpt)
    assert preprocessing.img_size == IMG
    assert torch.equal(_features(encoder, images), _features(_reference_encoder(reference), images))
    loaded = load_checkpoint(ckpt)
    assert loaded.raw.format == "dcp" and loaded.raw.step == 1
    decoder_state, _ = read_decoder(loaded)  # the pre-training decoder travels too (export --with-decoder)
    assert decoder_state
    assert all(torch.equal(v, reference["model"][f"model.decoder.{k}"]) for k, v in decoder_state.items())


@pytest.mark.slow
def test_probe_loader_and_export_read_the_directory(written, tmp_path, capsys):
    from aimv2 import load_encoder
    from aimv2.cli import main
    from aimv2.probe.features import load_probe_encoder

    _, ckpt, reference = written
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    expected = _features(_reference_encoder(reference), images)
    encoder, trained_size, _ = load_probe_encoder(str(ckpt))
    assert trained_size == IMG and torch.equal(_features(encoder, images), expected)
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "timm")]) == 0
    assert "exported the dcp checkpoint" in capsys.readouterr().out
    exported, _ = load_encoder(tmp_path / "timm")
    assert torch.equal(_features(exported, images), expected)


@pytest.mark.slow
def test_convert_writes_one_file_that_loads_and_resumes_a_plain_optimizer(written, tmp_path, capsys):
    from aimv2 import load_encoder
    from aimv2.checkpoints import detect_format
    from aimv2.cli import main
    from aimv2.engine.optim import build_optimizer

    _, ckpt, reference = written
    out = tmp_path / "one.ckpt"
    assert main(["checkpoint", "convert", str(ckpt), str(out)]) == 0
    assert f"to {out} (" in capsys.readouterr().out
    assert detect_format(out) == "lightning" and not list(tmp_path.glob(".*"))
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["global_step"] == 1 and checkpoint["hyper_parameters"] == HPARAMS
    for key, value in reference["model"].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    encoder, _ = load_encoder(out)
    assert torch.equal(_features(encoder, images), _features(_reference_encoder(reference), images))
    # The optimizer states in torch's own (index-keyed) form: a plain single-process optimizer loads them.
    module = _build(seed=9)
    optimizer = build_optimizer(module.model, 1e-3, 1e-4, (0.9, 0.95), 1e-8, fused=False)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    names = {id(p): n for n, p in module.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            expected = reference["optim"]["state"][names[id(param)]]
            assert torch.equal(optimizer.state[param]["exp_avg"], expected["exp_avg"])
    assert main(["checkpoint", "convert", str(ckpt), str(out)]) == 2  # never overwritten silently
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_save_is_a_one_line_error_and_resume_passes_over_it(written, tmp_path, capsys):
    from aimv2 import load_encoder
    from aimv2.cli import main
    from aimv2.engine.checkpointing import newest_intact, resolve_resume
    from aimv2.errors import UserError

    _, ckpt, _ = written
    run = tmp_path / "checkpoints"
    shutil.copytree(ckpt, run / "step=0000001.ckpt")
    broken = run / "step=0000002.ckpt"
    shutil.copytree(ckpt, broken)
    (broken / ".metadata").unlink()  # DCP writes it last: what a kill during the save leaves
    with pytest.raises(UserError) as err:
        load_encoder(broken)
    message = str(err.value)
    assert str(broken) in message and "incomplete DCP checkpoint: no .metadata" in message and "\n" not in message
    assert main(["export", str(broken), "--format", "aimv2", "--out", str(tmp_path / "x")]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and str(broken) in stderr
    assert newest_intact(run) == run / "step=0000001.ckpt"  # the newer step is not intact
    with pytest.raises(UserError, match=r"corrupt or truncated checkpoint: .*step=0000002\.ckpt \(incomplete DCP"):
        resolve_resume(str(broken), run)
    no_meta = run / "step=0000003.ckpt"
    shutil.copytree(ckpt, no_meta)
    (no_meta / "meta.pt").unlink()
    assert newest_intact(run) == run / "step=0000001.ckpt"
    # A missing rank's shard file: the index is there but a shard is not.
    (run / "step=0000001.ckpt" / "__1_0.distcp").unlink()
    with pytest.raises(UserError, match=r"DCP checkpoint unreadable, a shard file is missing or truncated"):
        load_encoder(run / "step=0000001.ckpt")


@pytest.mark.parametrize("killed_in", ["shards", "rename"])
def test_a_killed_save_leaves_nothing_under_the_checkpoints_name(tmp_path, monkeypatch, killed_in):
    from torch.distributed.checkpoint.api import CheckpointException

    import aimv2.fileio
    from aimv2.checkpoints import dcp
    from aimv2.engine.checkpointing import candidates, remove_stale_temporaries

    final = tmp_path / "step=0000005.ckpt"
    state = {"state_dict": {"model.encoder.w": torch.arange(6.0)}}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt(f"killed while writing the {killed_in}")

    if killed_in == "shards":  # DCP's writer serializes through torch.save
        monkeypatch.setattr(dcp.torch, "save", killed)
    else:  # everything written, killed just before the rename
        monkeypatch.setattr(aimv2.fileio, "publish_directory", killed)
    with pytest.raises((KeyboardInterrupt, CheckpointException)):
        dcp.save_dcp_checkpoint(state, {"global_step": 5}, final, rank=0, barrier=lambda: None)
    assert not final.exists() and candidates(tmp_path) == []
    assert remove_stale_temporaries(tmp_path) == [".step=0000005.ckpt.tmp"] and not list(tmp_path.iterdir())
    monkeypatch.undo()
    dcp.save_dcp_checkpoint(state, {"global_step": 5}, final, rank=0, barrier=lambda: None)
    assert sorted(p.name for p in final.iterdir()) == [".metadata", "__0_0.distcp", "meta.pt"]
    assert torch.equal(dcp.read_dcp_state(final)["state_dict"]["model.encoder.w"], torch.arange(6.0))


@pytest.mark.slow
def test_the_index_is_unpickled_without_running_code(written, tmp_path):
    from aimv2 import load_encoder
    from aimv2.errors import UserError

    _, ckpt, _ = written
    evil = tmp_path / "evil.ckpt"
    shutil.copytree(ckpt, evil)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match=r"refused to load: the pickle asks for the Python global `(posix|os)\.system`"):
        load_encoder(evil)
    assert not marker.exists()


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
