"""`model.init_from`, the paper's higher-resolution stages in miniature: a 56 px debug run on real digit
scans (shards from the project's writer), continued at 84 px from its last.ckpt. The second stage
starts near the first stage's final losses (not from scratch), with the position embedding resampled
and a fresh optimizer, schedule and step counter. Plus: exports with and without the decoder, sizes
that do not fit, a missing file, and a resume that wins over init_from."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.layers import resample_abs_pos_embed

from aimv2.checkpoints import export_checkpoint
from aimv2.config import ModelConfig, load_config
from aimv2.data.shards import ShardSample, write_shards
from aimv2.engine.logs import read_metric
from aimv2.errors import UserError
from aimv2.models import AIMv2, get_size
from aimv2.pretraining.init_from import apply_init_from, init_from_checkpoint
from aimv2.pretraining.pretrain import pretrain
from conftest import REPO

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N, BATCH = 64, 8
STAGE1_EPOCHS, STAGE2_STEPS = 5, 6  # 40 steps at 56 px, then 6 at 84 px
VOCAB, TEXT_LEN = 49408, 16  # the CLIP tokenizer the debug config uses; captions cut to 16 tokens


def digit_samples():
    digits = load_digits()
    for i in range(N):
        buf = io.BytesIO()
        pixels = (digits.images[i] * 15).astype("uint8")
        Image.fromarray(pixels).convert("RGB").resize((56, 56), Image.BICUBIC).save(buf, "JPEG")
        yield ShardSample(
            key=f"{i:09d}",
            image=buf.getvalue(),
            image_ext="jpg",
            caption=f"a handwritten digit {WORDS[digits.target[i]]}",
        )


def overrides(root, run: str, urls: str) -> list[str]:
    return [
        f"run_dir={root / run}",
        f"data.sources=[{{urls: '{urls}'}}]",
        "data.mode=epoch",
        f"data.batch_size={BATCH}",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        f"data.tokenizer.max_length={TEXT_LEN}",
        "optim.lr=3e-3",
        "optim.warmup_steps=4",
        "trainer.max_steps=-1",
        "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=1000",
        "trainer.progress_bar=false",
        "visualize.every_n_steps=0",
    ]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    urls = write_shards(digit_samples(), root / "shards", samples_per_shard=N, verify_images=False, progress=False).urls
    first = load_config(
        REPO / "configs/pretrain/debug.yaml",
        overrides(root, "s56", urls) + ["model.img_size=56", f"trainer.max_epochs={STAGE1_EPOCHS}"],
    )
    paths1 = pretrain(first)
    last1 = paths1.checkpoints / "last.ckpt"
    second = load_config(
        REPO / "configs/pretrain/debug.yaml",
        overrides(root, "s84", urls)
        + [
            "model.img_size=84",
            f"model.init_from={last1}",
            "optim.weight_decay=0",
            "trainer.max_epochs=1",
            f"trainer.max_steps={STAGE2_STEPS}",
        ],
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        paths2 = pretrain(second)
    return {"root": root, "last1": last1, "paths1": paths1, "paths2": paths2, "cfg2": second, "log2": out.getvalue()}


def losses(paths, key: str) -> list[float]:
    return [v for _, v in read_metric(paths.metrics, key)]


def test_second_stage_starts_near_the_first_stages_end(stages):
    report = {}
    for key in ("train/loss_img", "train/loss_text"):
        one, two = losses(stages["paths1"], key), losses(stages["paths2"], key)
        start1, end1, start2 = np.mean(one[:3]), np.mean(one[-3:]), two[0]
        report[key] = (start1, end1, start2)
        assert end1 < 0.8 * start1, f"{key}: stage 1 did not learn ({start1:.3f} -> {end1:.3f})"
        # Much closer to where stage 1 ended than to where it (and any fresh model) started.
        assert abs(start2 - end1) < 0.25 * (start1 - end1), f"{key}: {start1:.3f} -> {end1:.3f}, stage 2 {start2:.3f}"
    print("stage 1 first3/last3, stage 2 first:", {k: tuple(round(float(x), 3) for x in v) for k, v in report.items()})


def test_second_stage_is_a_new_run_at_the_new_resolution(stages):
    ckpt = torch.load(stages["paths2"].checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]["model.encoder.pos_embed"].shape == (1, 36, 64)  # (84/14)^2 tokens, resampled
    assert ckpt["global_step"] == STAGE2_STEPS  # the step counter started at 0
    steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {STAGE2_STEPS}, "fresh AdamW: its step count starts at 0"
    lrs = read_metric(stages["paths2"].metrics, "train/lr")
    assert lrs[0] == (0, pytest.approx(1e-6)), "fresh schedule: warmup from optim.warmup_start_lr"
    assert [s for s, _ in read_metric(stages["paths2"].metrics, "train/loss")] == list(range(STAGE2_STEPS))
    assert ckpt["hyper_parameters"]["model"]["init_from"] == str(stages["last1"])  # where the run came from
    log = stages["log2"]
    assert "trained at 56 px (16 tokens) -> position embedding resampled to 84 px (36 tokens)" in log
    assert "decoder loaded from the same checkpoint" in log


def fresh(img_size: int = 84, size: str = "debug", vocab: int = VOCAB) -> AIMv2:
    torch.manual_seed(1)
    return AIMv2(get_size(size), img_size, vocab, TEXT_LEN)


def stage1_weights(stages) -> dict[str, torch.Tensor]:
    state = torch.load(stages["last1"], map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.parametrize("with_decoder", [True, False], ids=["with_decoder", "encoder_only"])
def test_init_from_an_aimv2_export(stages, tmp_path, with_decoder):
    out = tmp_path / "export"
    export_checkpoint(stages["last1"], out, "aimv2", with_decoder=with_decoder)
    model = fresh()
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    lines = init_from_checkpoint(model, out)
    trained = stage1_weights(stages)
    pos = resample_abs_pos_embed(trained["encoder.pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=0)
    assert model.encoder.pos_embed.shape == (1, 36, 64) and torch.allclose(model.encoder.pos_embed, pos)
    assert torch.equal(model.encoder.blocks[1].mlp.fc2.weight, trained["encoder.blocks.1.mlp.fc2.weight"])
    decoder = model.decoder.state_dict()
    expected = (
        {k.removeprefix("decoder."): v for k, v in trained.items() if k.startswith("decoder.")}
        if with_decoder
        else before
    )
    assert all(torch.equal(decoder[k], v) for k, v in expected.items())
    assert ("decoder loaded" if with_decoder else "decoder not present in this aimv2 checkpoint") in "\n".join(lines)


@pytest.mark.parametrize(
    "size,vocab,match",
    [
        (
            "tiny",
            VOCAB,
            r"encoder width 64 vs 192, depth 2 vs 6, heads 2 vs 3, mlp_hidden 176 vs 512 .*"
            r"decoder mis-shaped .*image_proj\.weight \(64, 64\) vs \(192, 192\)",
        ),
        ("debug", 1000, r"decoder mis-shaped 2 \[text_embed\.weight \(49408, 64\) vs \(1000, 64\), text_head"),
    ],
)
def test_what_does_not_fit_is_one_line_listing_it(stages, size, vocab, match):
    model = fresh(size=size, vocab=vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fits = rf"model\.init_from: .*last\.ckpt does not fit model\.size={size}: {match}"
    with pytest.raises(UserError, match=fits) as err:
        init_from_checkpoint(model, stages["last1"])
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "nothing half-loaded"


def test_missing_file_and_resume(tmp_path):
    model = fresh()
    missing = tmp_path / "runs" / "nope" / "last.ckpt"
    cfg = ModelConfig("debug", 84, init_from=str(missing))
    with pytest.raises(UserError, match=rf"^config key 'model\.init_from': checkpoint not found: {missing}$"):
        apply_init_from(model, cfg, resume=None)
    # A resumed run keeps its own weights: init_from is not even read (the file may be gone by then).
    lines = apply_init_from(model, cfg, resume="runs/s84/checkpoints/last.ckpt")
    assert lines == [
        f"model.init_from={missing} ignored: the run resumes from runs/s84/checkpoints/last.ckpt "
        "(its weights, optimizer, step and data position win)"
    ]
    assert apply_init_from(model, ModelConfig("debug", 84), resume=None) == []


@pytest.mark.parametrize("res,previous", [(336, 224), (448, 336)])
def test_stage_configs_continue_the_previous_stage(res, previous):
    from dataclasses import replace

    stage = load_config(REPO / f"configs/pretrain/aimv2_large_{res}.yaml")  # loads although no run exists yet
    base = load_config(REPO / "configs/pretrain/aimv2_large_224.yaml")
    assert stage.model == ModelConfig("large", res, init_from=f"runs/aimv2_large_{previous}/checkpoints/last.ckpt")
    assert stage.optim.weight_decay == 0
    pairs_per_step = stage.data.batch_size * stage.trainer.devices * stage.trainer.num_nodes
    assert pairs_per_step == 8192
    assert stage.trainer.max_steps * pairs_per_step >= 2e9 > (stage.trainer.max_steps - 1) * pairs_per_step
    # AIMv2 Section 2.4: "2 billion image-text pairs sampled from the same pool as the pre-training
    # stage, except that we do not use synthetic captions at this stage". The pool is the 224 px
    # mixture (Table 2: DFN alt 30%, DFN synthetic 30%, COYO 9%, HQITP alt 28%, HQITP synthetic 3%).
    assert [s.name for s in base.data.sources] == [
        "dfn2b_alt",
        "dfn2b_synthetic",
        "coyo",
        "hqitp_alt",
        "hqitp_synthetic",
    ]
    assert stage.data.sources == [s for s in base.data.sources if "synthetic" not in s.name]
    assert [s.weight for s in stage.data.sources] == [0.30, 0.09, 0.28]
    # The sampler draws by relative weight: 30/67, 9/67, 28/67 of the stage's samples.
    probs = [s.weight / sum(x.weight for x in stage.data.sources) for s in stage.data.sources]
    assert probs == pytest.approx([0.447761, 0.134328, 0.417910], abs=1e-6)
    # Everything else is the 224 px recipe.
    assert (
        replace(
            stage,
            run_dir=base.run_dir,
            model=base.model,
            optim=replace(stage.optim, weight_decay=base.optim.weight_decay),
            data=replace(stage.data, seed=base.data.seed, sources=base.data.sources),
            trainer=replace(stage.trainer, max_steps=base.trainer.max_steps),
        )
        == base
    )
