"""One checkpoint schema (aimv2.checkpoints.schema): what a real pre-training checkpoint holds is what the
schema declares, `aimv2 checkpoint schema|inspect` print it, a newer version is refused in one line naming
both versions (loading and resuming), and a checkpoint written before versions (version 1) still resumes."""

from __future__ import annotations

import shutil

import pytest
import torch

from aimv2 import load_encoder
from aimv2.checkpoints import schema
from aimv2.cli import main
from aimv2.errors import UserError
from checkpoint_helpers import pretrain_debug


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    return pretrain_debug(root, img_size=28, steps=2)


def test_schema_command_lists_the_version_and_every_key(capsys):
    assert main(["checkpoint", "schema"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint schema version {schema.CHECKPOINT_VERSION} ")
    for name in [f.name for f in schema.FIELDS] + list(schema.LIGHTNING_KEYS) + list(schema.HEAD_STATE_KEYS):
        assert f"  {name} " in out, name


def test_write_stamps_the_version_and_refuses_undeclared_fields():
    checkpoint: dict = {}
    schema.write(checkpoint, job="pretrain", nonfinite_steps=3)
    assert checkpoint == {"aimv2": {"nonfinite_steps": 3, "version": 2, "job": "pretrain"}}
    with pytest.raises(KeyError, match="undeclared checkpoint field.*'loss_scale'"):
        schema.write(checkpoint, loss_scale=1.0)
    with pytest.raises(KeyError, match="unknown job 'probe'"):
        schema.write(checkpoint, job="probe")


def test_version_1_is_upgraded_and_a_newer_version_is_refused():
    old = {
        "global_step": 4,
        "metrics_row": {"step": 3, "metrics": {"train/loss": 1.5}},
        "aimv2": {"nonfinite_steps": 0},
    }
    assert schema.version_of(old) == 1
    part = schema.read(old, "old.ckpt")
    assert part == {"nonfinite_steps": 0, "metrics_row": {"step": 3, "metrics": {"train/loss": 1.5}}}
    assert "metrics_row" not in old  # moved under "aimv2", where version 2 keeps it
    newer = {"aimv2": {"version": 3}}
    with pytest.raises(UserError) as err:
        schema.read(newer, "new.ckpt")
    assert str(err.value) == (
        "new.ckpt: checkpoint schema version 3 is newer than this aimv2 reads (version 2); "
        "upgrade aimv2 to resume or load it"
    )


def test_a_real_checkpoint_holds_what_the_schema_declares(trained, capsys):
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    part = checkpoint["aimv2"]
    assert part["version"] == schema.CHECKPOINT_VERSION and part["job"] == "pretrain"
    assert set(part) <= schema.FIELD_NAMES
    assert {"nonfinite_steps", "metrics_row"} <= set(part)
    assert "metrics_row" not in checkpoint  # nothing of the toolkit's at Lightning's level
    assert schema.global_step(checkpoint) == 2
    weights = schema.model_state(checkpoint)
    assert any(k.startswith("model.encoder.") for k in weights) and any(k.startswith("model.decoder.") for k in weights)

    assert main(["checkpoint", "inspect", str(trained)]) == 0
    out = capsys.readouterr().out
    assert f"{trained}: format lightning" in out
    assert "  schema version 2\n" in out and "  job pretrain, step 2\n" in out
    assert "  nonfinite_steps: 0\n" in out


def test_newer_checkpoints_are_refused_by_load_and_resume(trained, tmp_path, capsys):
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    checkpoint["aimv2"]["version"] = schema.CHECKPOINT_VERSION + 1
    newer = tmp_path / "newer.ckpt"
    torch.save(checkpoint, newer)
    with pytest.raises(
        UserError,
        match=r"newer.ckpt: checkpoint schema version 3 is newer than this aimv2 reads "
        r"\(version 2\)",
    ):
        load_encoder(newer)
    assert main(["checkpoint", "inspect", str(newer)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schema version 3" in err[0] and "(version 2)" in err[0]

    run = trained.parent.parent
    assert (
        main(
            [
                "pretrain",
                str(run / "config.yaml"),
                f"run_dir={tmp_path / 'resumed'}",
                f"trainer.resume={newer}",
                "trainer.max_steps=3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "checkpoint schema version 3 is newer than this aimv2 reads (version 2); upgrade aimv2 to resume or load it"
    ), err[-1]


def test_a_version_1_checkpoint_still_resumes(trained, tmp_path):
    """As written before the schema: no version or job, the logs' row at the top level."""
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    part = checkpoint.pop("aimv2")
    checkpoint["metrics_row"] = part.pop("metrics_row")
    checkpoint["aimv2"] = {"nonfinite_steps": part["nonfinite_steps"]}
    run = tmp_path / "run"
    shutil.copytree(trained.parent.parent, run)
    old = run / "checkpoints" / "last.ckpt"
    torch.save(checkpoint, old)
    assert (
        main(["pretrain", str(run / "config.yaml"), f"run_dir={run}", f"trainer.resume={old}", "trainer.max_steps=3"])
        == 0
    )
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert schema.global_step(resumed) == 3 and resumed["aimv2"]["version"] == 2
    assert "metrics_row" not in resumed
