"""`aimv2 compress sweep` end to end on real demo shards with tiny random LMs: 2 LMs x 2 M = 4 cells, each
trained and evaluated through `compress train` / `evaluate`, one results.csv, then the fit; a rerun
redoes nothing; one cell at a time (a SLURM array task) fits only once the grid is complete; a cell
made with other settings is refused; the error column is the held-out caption token error."""

import csv
import json

import pytest
import torch

from aimv2.cli import main
from aimv2.compress.components import prefill_params
from aimv2.compress.module import held_out_loader, load_module
from aimv2.data.demo import build_demo_shards
from compress_utils import write_encoder_checkpoint

LMS = """
lms:
  - name: h16
    overrides: [lm.hidden_size=16, lm.intermediate_size=32, lm.num_heads=2]
  - name: h32
    overrides: [lm.hidden_size=32, lm.intermediate_size=64, lm.num_heads=4]
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    demo = build_demo_shards(tmp / "data", image_size=56)  # 4 x 4 patches for the debug encoder
    shards = demo["pretrain"]["dir"]
    encoder = write_encoder_checkpoint(tmp / "encoder.ckpt", img_size=56)
    compress = tmp / "compress.yaml"
    compress.write_text(f"""
stage: 2
encoder: {{source: {encoder}}}
compressor: {{kind: pool, num_tokens: 4}}
lm: {{num_layers: 1, max_positions: 64}}
text: {{tokenizer: {{kind: clip, max_length: 12}}}}
data: {{train: '{shards}/{{00000..00004}}.tar', val: '{shards}/00005.tar', batch_size: 8, num_workers: 0,
        shuffle_buffer: 50}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
trainer: {{accelerator: cpu, max_steps: 4, log_every_n_steps: 1, checkpoint_every_n_steps: 1000, progress_bar: false}}
""")
    sweep = tmp / "sweep.yaml"
    sweep.write_text(
        f"compress: compress.yaml\nout: {tmp / 'out'}\ntokens: [1, 4]\n{LMS}"
        "eval: {batch_size: 16, num_workers: 0, max_batches: 2}\nfit: {bootstrap: 5}\n"
    )
    return {"tmp": tmp, "sweep": sweep, "out": tmp / "out", "val": f"{shards}/00005.tar"}


@pytest.fixture(scope="module")
def swept(setup):
    assert main(["compress", "sweep", str(setup["sweep"])]) == 0
    return setup


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_cell_trains_evaluates_and_the_law_is_fitted(swept):
    out = swept["out"]
    rows = _rows(out / "results.csv")
    assert [(r["lm"], int(r["visual_tokens"])) for r in rows] == [("h16", 1), ("h16", 4), ("h32", 1), ("h32", 4)]
    for r in rows:
        assert 0.0 <= float(r["error"]) <= 1.0 and float(r["loss"]) > 0
        # N is the cell's LM without its input embedding table (the prefill formula's N_params)
        lm = load_module(r["checkpoint"]).vlm.lm
        assert int(r["llm_params"]) == prefill_params(lm)
        assert torch.load(r["checkpoint"], map_location="cpu", weights_only=True)["global_step"] == 4
    assert int(rows[0]["llm_params"]) == int(rows[1]["llm_params"]) < int(rows[2]["llm_params"])
    fit = json.loads((out / "fit" / "fit.json").read_text())
    assert {"A", "alpha", "beta", "D", "rmse", "optimal"} <= set(fit)
    assert (out / "fit" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_error_is_the_held_out_caption_token_error(swept):
    """Recomputed by hand: greedy next-token hits over the caption tokens of the cell's first 2 batches."""
    row = _rows(swept["out"] / "results.csv")[1]  # h16, M = 4
    module = load_module(row["checkpoint"]).eval()
    vlm = module.vlm
    loader = held_out_loader(swept["val"], "val", module.tokenizer, vlm.preprocessing, 16, 0)
    hits = total = 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 2:
                break
            captions, mask = batch["tokens"], batch["token_mask"]
            embeds, attention, n_before = vlm.sequence(
                vlm.visual_tokens(batch["image"]), captions.shape[0], captions, mask
            )
            logits = vlm.lm(inputs_embeds=embeds, attention_mask=attention).logits  # (B, S, V)
            predicted = logits[:, n_before - 1 : -1].argmax(-1)  # position t-1 predicts caption token t
            hits += int(((predicted == captions) & mask).sum())
            total += int(mask.sum())
    assert float(row["error"]) == pytest.approx(1 - hits / total, abs=1e-9)


@pytest.mark.slow
def test_a_rerun_redoes_nothing(swept, capsys):
    ckpts = sorted(swept["out"].glob("cells/*/checkpoints/last.ckpt"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    assert main(["compress", "sweep", str(swept["sweep"])]) == 0
    err = capsys.readouterr().err
    assert err.count(": done (") == 4 and "training" not in err
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps


@pytest.mark.slow
def test_one_cell_per_array_task_and_the_fit_once_the_grid_is_complete(setup, capsys, monkeypatch):
    out = setup["tmp"] / "array"
    args = ["compress", "sweep", str(setup["sweep"]), f"out={out}", "overrides=[trainer.max_steps=2]"]
    assert main([*args, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "4 cells (sbatch --array=0-3" in listed and "1: h16_m4" in listed
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert main([*args, "--cell", "auto"]) == 0
    err = capsys.readouterr().err
    assert "1 of 4 cells done" in err and "the fit waits for cells 0 (h16_m1), 2 (h32_m1), 3 (h32_m4)" in err
    assert [(r["lm"], r["visual_tokens"]) for r in _rows(out / "results.csv")] == [("h16", "4")]
    assert not (out / "fit").exists() and sorted(p.name for p in (out / "cells").iterdir()) == ["h16_m4"]
    assert main(args) == 0  # the rest of the grid (cell 1 is not redone), then the fit
    err = capsys.readouterr().err
    assert "cell 1 (h16_m4): done" in err and "4 of 4 cells done" in err
    assert len(_rows(out / "results.csv")) == 4 and (out / "fit" / "fit.json").is_file()


@pytest.mark.slow
def test_a_cell_made_with_other_settings_is_refused(swept, capsys):
    assert main(["compress", "sweep", str(swept["sweep"]), "overrides=[trainer.max_steps=6]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "h16_m1 was trained with other settings" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("overrides=[compressor.kind=mlp]", "config key 'compressor.kind': mlp keeps all N patch tokens"),
        ("tokens=[0,4]", "config key 'tokens': a list of M >= 1"),
        ("compress=missing.yaml", "config key 'compress': config file not found: missing.yaml"),
        ("lms=[{name: a}]", "config key 'lms': name at least two LMs"),
        ("tokens=[4]", "config key 'tokens': needs at least two values of M"),
    ],
)
def test_bad_sweeps_are_one_line_errors(setup, capsys, override, message):
    assert main(["compress", "sweep", str(setup["sweep"]), f"out={setup['tmp'] / 'bad'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (setup["tmp"] / "bad" / "cells").exists()  # nothing trained


def test_a_cell_number_outside_the_grid_is_refused(setup, capsys):
    assert main(["compress", "sweep", str(setup["sweep"]), "--cell", "9"]) == 2
    assert "--cell 9: the sweep has 4 cells (0..3)" in capsys.readouterr().err
