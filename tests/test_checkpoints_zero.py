"""DeepSpeed ZeRO checkpoints -> one fp32 state dict on the CPU. The checkpoints are real: DeepSpeed
itself writes them on the CPU (its CPU accelerator, a gloo process group, one rank) for stages 2 and
3 after an optimizer step, in Lightning's layout (tag `checkpoint`, hyper-parameters in the client
state), in a subprocess so its global state stays out of the test process."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from aimv2 import load_encoder
from aimv2.checkpoints import detect_format
from aimv2.checkpoints.zero import read_zero_checkpoint
from aimv2.cli import main
from aimv2.errors import UserError
from checkpoint_helpers import write_zero_checkpoints

pytestmark = pytest.mark.slow  # every test reads the module's real ZeRO checkpoints (about 18 s to write)

IMG = 28


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    dirs = write_zero_checkpoints(root, img_size=IMG)
    return root, dirs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_converts_to_the_trained_weights(zero, stage):
    root, dirs = zero
    reference = load_file(root / f"reference_{stage}.safetensors")  # the module's weights after the step
    assert detect_format(dirs[stage]) == "zero"
    state, client = read_zero_checkpoint(dirs[stage])
    assert state.keys() == reference.keys()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], reference[k]) for k in reference)
    assert client["hyper_parameters"]["model"] == {
        "size": "debug",
        "img_size": IMG,
        "init_from": None,
        "native": False,
        "attention": "auto",
    }
    # As an encoder: the hyper-parameters pick the architecture; the tag directory works as well.
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    expected = {k.removeprefix("model.encoder."): v for k, v in reference.items() if k.startswith("model.encoder.")}
    for source in (dirs[stage], dirs[stage] / "checkpoint"):
        encoder, pre = load_encoder(source)
        assert pre.img_size == IMG
        assert all(torch.equal(encoder.state_dict()[k], v) for k, v in expected.items())
        with torch.no_grad():
            tokens = encoder.forward_features(images)
        assert tokens.shape == (2, 4, 64) and torch.isfinite(tokens).all()


def test_zero_checkpoint_exports_for_transformers(zero, tmp_path):
    _, dirs = zero
    assert main(["export", str(dirs[3]), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    a, _ = load_encoder(dirs[3])
    b, _ = load_encoder(tmp_path / "hf")
    images = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert (a.forward_features(images) - b.forward_features(images)).abs().max() <= 1e-5


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_zero_conversion_never_runs_code_from_the_files(zero, tmp_path):
    """DeepSpeed's converter unpickles with weights_only=False; ours forces weights_only on it."""
    _, dirs = zero
    evil = tmp_path / "evil"
    shutil.copytree(dirs[2], evil)
    states = evil / "checkpoint" / "mp_rank_00_model_states.pt"
    content = torch.load(states, weights_only=True)
    marker = tmp_path / "pwned"
    content["extra"] = _Payload(str(marker))
    torch.save(content, states)
    with pytest.raises(UserError, match="refused to load") as err:
        load_encoder(evil)
    assert "\n" not in str(err.value) and "evil" in str(err.value)
    assert not marker.exists()


def test_incomplete_zero_checkpoint_is_a_one_line_error(zero, tmp_path):
    _, dirs = zero
    broken = tmp_path / "broken"
    shutil.copytree(dirs[2], broken)
    (broken / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match="not a complete ZeRO checkpoint") as err:
        load_encoder(broken)
    assert "\n" not in str(err.value)
