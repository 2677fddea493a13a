"""The held-out validation loss of pre-training (data.val; aimv2.pretraining.validation): rows at the
right steps, the value a hand computation gives, no effect on training, the sample counter over a
resume, corrupt held-out samples skipped and counted, bad input named; each slot reads only its own
samples (seeking to them by an index of tar headers), seeing what a read from the shard's start sees."""

import csv
import io
import math
import os
import shutil
import signal
import sys
import tarfile
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from PIL import Image

from aimv2.config import load_config
from aimv2.data.every_sample import EverySample, ReadPlan, every_sample_loader, first_samples, plan_ranges, read_cost
from aimv2.data.samples import eval_transform
from aimv2.data.tar_ranges import ScanStats, index_ranges, read_ranges, slot_starts
from aimv2.data.tokenizer import build_tokenizer
from aimv2.engine.checkpointing import Preempted, PreemptionCheckpoint
from aimv2.engine.logs import read_metric, read_metrics
from aimv2.engine.run_dir import RunDir
from aimv2.errors import UserError
from aimv2.models.sizes import get_size, training_flops_per_sample
from aimv2.pretraining.module import AIMv2PretrainModule
from aimv2.pretraining.pretrain import pretrain
from aimv2.pretraining.validation import METRICS, HeldOutCollator, HeldOutLoss, HeldOutProcessor, prefix_length
from conftest import REPO, write_caption_shards
from fault_helpers import run_or_show_stacks, tiny_tokenizer
from test_tar_ranges import read_from_shard_starts, without_index

BATCH, STEPS, EVERY = 4, 7, 3
VAL_ROWS = [2, 5, 6]  # the rows (Lightning's 0-based step column) of optimizer steps 3, 6 and 7 (the last)
VAL_N, VAL_CORRUPT = 10, 2  # 10 held-out samples in shards of 4; sample 2 is corrupt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    train = write_caption_shards(root / "train", 40, 100, prefix="t")
    val = write_caption_shards(root / "val", VAL_N, 4, prefix="v", seed=1, corrupt_at={VAL_CORRUPT})
    tokenizer = tiny_tokenizer(root / "tokenizer")
    return root, train.urls, val.urls, tokenizer


def config(setup, name: str, *extra: str, val: bool = True):
    root, train_urls, val_urls, tokenizer = setup
    overrides = [
        f"run_dir={root / name}",
        f"data.sources=[{{urls: '{train_urls}'}}]",
        "model.img_size=28",
        f"data.batch_size={BATCH}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.tokenizer.max_length=8",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=5",
        "trainer.checkpoint_every_n_steps=3",
        "trainer.keep_checkpoints=-1",
        "trainer.progress_bar=false",
        "visualize.every_n_steps=0",
        "optim.warmup_steps=2",
        *tokenizer,
        *([f"data.val.urls={val_urls}", f"data.val.every_n_steps={EVERY}", "data.val.batch_size=3"] if val else []),
        *extra,
    ]
    return load_config(REPO / "configs/pretrain/debug.yaml", overrides)


@pytest.fixture(scope="module")
def with_val(setup):
    cfg = config(setup, "with_val")
    return cfg, pretrain(cfg)


@pytest.fixture(scope="module")
def without_val(setup):
    cfg = config(setup, "without_val", val=False)
    return cfg, pretrain(cfg)


def test_rows_at_the_expected_steps_with_sample_and_flop_counts(with_val):
    cfg, run = with_val
    series = read_metrics(run.metrics, METRICS)
    for name in METRICS:
        assert [s for s, _ in series[name]] == VAL_ROWS, name  # written whatever trainer.log_every_n_steps (5)
        assert all(math.isfinite(v) for _, v in series[name]), name
    samples = [v for _, v in series["val/train_samples"]]
    assert samples == [(s + 1) * BATCH for s in VAL_ROWS]  # one process: step x batch
    # Every training caption ("sample i") is the same number of real tokens: the FLOPs are exact.
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    counts = {int(m.sum()) for m in tokenizer([f"sample {i}" for i in range(40)])[1]}
    assert len(counts) == 1
    per_sample = training_flops_per_sample(
        get_size("debug"), 28, cfg.data.tokenizer.max_length, counts.pop(), tokenizer.vocab_size
    )["total"]
    assert [v for _, v in series["val/train_flops"]] == pytest.approx([n * per_sample for n in samples], rel=1e-12)
    # The corrupt held-out sample is skipped and counted at every evaluation.
    assert [v for _, v in series["val/samples"]] == [VAL_N - 1] * 3
    assert [v for _, v in series["val/skipped_samples"]] == [1] * 3
    # The objective's weights as in training.
    for (_, total), (_, img), (_, text) in zip(series["val/loss"], series["val/loss_img"], series["val/loss_text"]):
        assert total == pytest.approx(cfg.objective.text_weight * text + cfg.objective.alpha * img, rel=1e-12)
    # The training rows are untouched: one per logging step.
    assert [s for s, _ in read_metric(run.metrics, "train/loss")] == [4]


def same(a, b) -> bool:
    """Equality of nested states holding tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_validation_does_not_change_training(with_val, without_val):
    _, run_a = with_val
    _, run_b = without_val
    a = torch.load(run_a.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run_b.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert same(a["PretrainDataModule"], b["PretrainDataModule"])  # the training stream's position
    assert "train_samples" not in b["aimv2"]  # no counter (and no collective) without data.val
    assert not any(k.startswith("val/") for k in open(run_b.metrics).readline().strip().split(","))


def read_held_out(urls_spec: str):
    """Every held-out sample of the shards, read with tarfile (not the loader under test)."""
    out = []
    for url, _, _ in first_samples(urls_spec, 0, "val"):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(url) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        out += [(url, key, sample) for key, sample in members.items()]
    return out


def test_value_equals_a_hand_computation_and_is_deterministic(setup, with_val):
    cfg, run = with_val
    module = AIMv2PretrainModule.load_from_checkpoint(
        run.checkpoints / "last.ckpt", map_location="cpu", weights_only=True
    ).eval()
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    n = module.model.num_patches
    img_sum = img_n = text_sum = text_n = 0.0
    with torch.no_grad():
        for url, key, sample in read_held_out(setup[2]):
            try:
                image = eval_transform(28)(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            except OSError:
                continue  # the corrupt one
            ids, mask = tokenizer([sample["txt"].decode()])
            m = prefix_length(url, key, n)
            losses, _ = module._losses(
                {"image": image[None], "tokens": ids, "token_mask": mask}, None, prefix=torch.tensor([m])
            )
            img_sum, img_n = img_sum + float(losses.image) * (n - m), img_n + (n - m)
            text_sum, text_n = text_sum + float(losses.text) * int(mask.sum()), text_n + int(mask.sum())
    final = {name: values[-1][1] for name, values in read_metrics(run.metrics, METRICS).items()}
    assert final["val/loss_img"] == pytest.approx(img_sum / img_n, abs=1e-5)
    assert final["val/loss_text"] == pytest.approx(text_sum / text_n, abs=1e-5)
    assert final["val/loss"] == pytest.approx(text_sum / text_n + cfg.objective.alpha * img_sum / img_n, abs=1e-5)

    # The callback scores the same weights twice: the same sums, bit for bit.
    score = scorer(cfg, module)
    torch.manual_seed(123)
    first = score()
    state = torch.get_rng_state()
    second = score()
    assert torch.equal(first, second)
    assert torch.equal(state, torch.get_rng_state())  # torch's random state is left as it was
    assert float(first[0] / first[1]) == final["val/loss_img"]  # what the run logged, bit for bit


def scorer(cfg, module):
    """The callback's scoring of `module` in one process (a stand-in trainer): -> the sums of `score`."""
    callback = HeldOutLoss(cfg.data.val, cfg.model, cfg.data.batch_size, build_tokenizer(cfg.data.tokenizer))
    trainer = SimpleNamespace(global_rank=0, world_size=1, precision_plugin=Precision())
    callback.setup(trainer, module, "fit")
    return lambda: callback.score(trainer, module)


class SignalAtStep(Callback):
    """Raise the preemption flag after `step`: the run saves last.ckpt at the next step and stops."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            for callback in trainer.callbacks:
                if isinstance(callback, PreemptionCheckpoint):
                    callback.received = signal.SIGTERM


def test_counter_continues_over_a_resume(setup, with_val):
    _, uninterrupted = with_val
    cfg = config(setup, "resumed", "data.val.num_workers=1")  # the held-out loader with a worker this time
    with pytest.raises(Preempted) as stop:  # a SystemExit(0): under the command, the process ends there
        pretrain(cfg, callbacks=[SignalAtStep(5)])
    assert (stop.value.code, stop.value.step, stop.value.requeue) == (0, 6, False)  # not under SLURM
    run = RunDir(cfg.run_dir)
    last = torch.load(run.checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6 and last["aimv2"]["train_samples"] == 6 * BATCH
    # The step-3 checkpoint was taken after that step's evaluation, before its row was written: it carries it.
    step3 = torch.load(run.checkpoints / "step=0000003.ckpt", map_location="cpu", weights_only=True)
    assert step3["aimv2"]["val_row"][0] == 2 and step3["aimv2"]["train_samples"] == 3 * BATCH

    pretrain(replace(cfg, trainer=replace(cfg.trainer, resume="auto")))
    got = read_metrics(run.metrics, METRICS)
    want = read_metrics(uninterrupted.metrics, METRICS)
    assert [s for s, _ in got["val/loss"]] == VAL_ROWS  # the evaluation after the signal was written once
    assert got["val/train_samples"] == want["val/train_samples"]  # 28 at the end: counted on from 24
    for name in ("val/loss", "val/loss_img", "val/loss_text"):  # exact resume: the same weights, the same values
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in want[name]], abs=1e-6)
    assert [s for s, _ in read_metric(run.metrics, "train/loss")] == [4]


def test_a_row_lost_after_its_checkpoint_is_written_on_resume(setup, with_val, tmp_path):
    """A kill after the step-3 checkpoint (taken after that step's evaluation), before its row reached
    metrics.csv: the checkpoint carries the row and the resumed run writes it."""
    _, uninterrupted = with_val
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted.root, run_dir)
    metrics = run_dir / "logs/metrics.csv"
    with open(metrics, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if int(r["step"]) < 2]
    with open(metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    cfg = config(setup, "with_val")
    pretrain(
        replace(
            cfg,
            run_dir=str(run_dir),
            trainer=replace(cfg.trainer, resume=str(run_dir / "checkpoints/step=0000003.ckpt")),
        )
    )
    assert read_metrics(metrics, METRICS) == read_metrics(uninterrupted.metrics, METRICS)


def test_bad_input_is_named(setup, tmp_path):
    cfg = config(setup, "bad")
    missing = replace(
        cfg,
        run_dir=str(tmp_path / "run"),
        data=replace(cfg.data, val=replace(cfg.data.val, urls=str(tmp_path / "nope/00000.tar"))),
    )
    with pytest.raises(UserError) as err:
        pretrain(missing)
    assert str(err.value) == f"data.val.urls: shard not found: {tmp_path}/nope/00000.tar"
    with pytest.raises(UserError, match=r"^config key 'data\.val\.every_n_steps': must be >= 0"):
        config(setup, "bad", "data.val.every_n_steps=-1")
    with pytest.raises(UserError, match=r"^config key 'data\.val\.urls': .*native"):
        config(setup, "bad", "model.native=true")


def test_the_set_is_capped_and_split_without_overlap(setup):
    ranges = first_samples(setup[2], 7, "data.val.urls")  # shards of 4, 4, 2: the first 7 samples
    assert [(r[0].rsplit("/", 1)[1], r[1], r[2]) for r in ranges] == [("00000.tar", 0, 4), ("00001.tar", 0, 3)]
    parts = plan_ranges(ranges, 3).slots
    assert [sum(e - f for _, f, e in p) for p in parts] == [2, 2, 3]
    flat = [(url, i) for part in parts for url, f, e in part for i in range(f, e)]
    assert flat == [(url, i) for url, f, e in ranges for i in range(f, e)]  # contiguous, in order, each once


@pytest.mark.slow
def test_two_ddp_ranks_score_disjoint_halves_and_sum_them(setup, tmp_path):
    """2 CPU ranks (gloo), through the CLI: each rank scores its part of the 10 held-out samples (5 and 5,
    batches of 2), the sums are all-reduced: the logged loss is the single-process loss of the same
    weights, and the training sample count is step x batch x 2."""
    _, train_urls, val_urls, tokenizer = setup
    cmd = [
        sys.executable,
        "-m",
        "aimv2",
        "pretrain",
        str(REPO / "configs/pretrain/debug.yaml"),
        *tokenizer,
        f"run_dir={tmp_path / 'run'}",
        f"data.sources=[{{urls: '{train_urls}'}}]",
        "model.img_size=28",
        f"data.batch_size={BATCH}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.tokenizer.max_length=8",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=5",
        "trainer.progress_bar=false",
        "visualize.every_n_steps=0",
        "optim.warmup_steps=2",
        f"data.val.urls={val_urls}",
        "data.val.every_n_steps=2",
        "data.val.batch_size=2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = run_or_show_stacks(cmd, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run/logs/metrics.csv", METRICS)
    assert [s for s, _ in metrics["val/loss"]] == [1, 2]
    assert [v for _, v in metrics["val/train_samples"]] == [2 * BATCH * 2, 3 * BATCH * 2]
    assert [v for _, v in metrics["val/samples"]] == [VAL_N - 1] * 2  # every sample once over both ranks
    assert [v for _, v in metrics["val/skipped_samples"]] == [1] * 2

    cfg = load_config(tmp_path / "run/config.yaml")
    module = AIMv2PretrainModule.load_from_checkpoint(
        tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    sums = scorer(cfg, module)()
    assert metrics["val/loss_img"][-1][1] == pytest.approx(float(sums[0] / sums[1]), abs=1e-6)
    assert metrics["val/loss_text"][-1][1] == pytest.approx(float(sums[2] / sums[3]), abs=1e-6)


def test_a_rehearsal_keeps_the_validation_and_stands_the_demo_in_for_unreadable_held_out_shards(setup, tmp_path):
    """`--rehearse` on a config whose held-out shards live on the cluster: the validation still runs (on 8
    demo samples), said so; readable ones are used as they are. No val.urls: nothing changes."""
    from aimv2.config.schema import ValConfig
    from aimv2.engine.rehearsal import RehearsalReport
    from aimv2.pretraining.rehearse import _shrink_val

    report = RehearsalReport("t")
    cluster = _shrink_val(ValConfig(urls="/lustre/val/{00000..00003}.tar", every_n_steps=5000), tmp_path, report)
    assert cluster.urls.startswith(str(tmp_path / "demo_data")) and cluster.max_samples == 8
    assert cluster.batch_size == 2 and cluster.every_n_steps == 5000  # the last step validates in any case
    assert [(f.area, f.status) for f in report.findings] == [("data.val", "changed")]
    assert "/lustre/val/00000.tar" in report.findings[0].detail
    val = setup[2]
    here = _shrink_val(ValConfig(urls=val, max_samples=4, batch_size=16), tmp_path, report)
    assert (here.urls, here.max_samples, here.batch_size) == (val, 4, 2)
    assert report.findings[-1].status == "ok"
    assert _shrink_val(ValConfig(), tmp_path, report) == ValConfig() and len(report.findings) == 2


# -- reading each slot's ranges from their first sample ------------------------------------------
SEEK_N, SEEK_PER, SEEK_CORRUPT = 45, 17, {3, 20, 40}  # shards of 17, 17, 11 samples; 3 corrupt
WORLD, WORKERS = 4, 2  # 8 slots of 5 or 6 samples, most starting inside a shard


@pytest.fixture(scope="module")
def seek_shards(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("seek")
    report = write_caption_shards(root, SEEK_N, SEEK_PER, prefix="s", seed=2, corrupt_at=SEEK_CORRUPT)
    tokenizer = build_tokenizer(config(setup, "tokenizer").data.tokenizer)
    return first_samples(report.urls, 0, "val"), tokenizer


def batches(units, tokenizer, starts):
    one_slot = ReadPlan([units])  # debug at 28 px: 16 patches
    return list(EverySample(one_slot, 0, HeldOutProcessor(28, 16), HeldOutCollator(tokenizer), 2, starts))


def test_each_slot_reads_exactly_its_samples_and_sees_what_a_read_from_the_start_sees(seek_shards):
    ranges, tokenizer = seek_shards
    plan = plan_ranges(ranges, WORLD, WORKERS)
    slots = plan.slots
    stats = ScanStats()
    index = index_ranges(slots, stats=stats)  # one process: every shard
    cost = read_cost(plan)
    assert cost["after"] == cost["held_out"] == SEEK_N and cost["before"] > 2 * SEEK_N
    for p, units in enumerate(slots):
        starts = slot_starts([units], index)
        assert len(starts) == sum(first > 0 for _, first, _ in units)  # every range inside a shard seeks
        got = list(read_ranges(units, starts))
        assert sum(passed for passed, _ in got) == cost["per_slot_after"][p] == sum(e - f for _, f, e in units)
        want = read_from_shard_starts(units)
        assert [without_index(s) for _, s in got] == want  # keys, __url__, every field's bytes
        assert [s["__index__"] for _, s in got] == [j for _, f, e in units for j in range(f, e)]
        old = list(read_ranges(units, {}))  # no index: from each shard's start, as before
        assert sum(passed for passed, _ in old) == cost["per_slot_before"][p]
        assert [without_index(s) for _, s in old] == want

        new_batches, old_batches = batches(units, tokenizer, starts), batches(units, tokenizer, None)
        assert sum(b["read"] for b in new_batches) == cost["per_slot_after"][p]
        assert sum(b["read"] for b in old_batches) == cost["per_slot_before"][p]
        assert len(new_batches) == len(old_batches)
        for a, b in zip(new_batches, old_batches):
            assert a.keys() == b.keys()
            for key in a.keys() - {"read"}:
                assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
        shard_of = {url: n for n, (url, _, _) in enumerate(ranges)}
        corrupt = sum(shard_of[url] * SEEK_PER + j in SEEK_CORRUPT for url, f, e in units for j in range(f, e))
        assert sum(b["skipped"] for b in new_batches) == corrupt  # corrupt samples counted as before
    assert sum(sum(b["skipped"] for b in batches(u, tokenizer, slot_starts([u], index))) for u in slots) == 3

    # The headers walked: each shard up to the first member of its last range start, 3 members a sample.
    assert (stats.shards, cost["scan_shards"]) == (3, 3)
    assert stats.headers == 3 * cost["scan_samples"] + cost["scan_shards"]
    assert stats.bytes <= 513 * stats.headers  # a 512-byte header and the byte before it, no member data

    # Each shard is walked by one rank (dealt round robin); the parts together are the whole index.
    parts = [index_ranges(slots, rank, WORLD) for rank in range(WORLD)]
    assert sorted(url for part in parts for url in part) == sorted(index)
    assert {url: starts for part in parts for url, starts in part.items()} == index


def test_the_callback_indexes_at_setup_and_says_what_an_evaluation_reads(setup, caplog):
    cfg = config(setup, "indexed", "data.val.num_workers=2")  # slots [0, 5) and [5, 10): the second starts in 00001
    callback = HeldOutLoss(cfg.data.val, cfg.model, cfg.data.batch_size, build_tokenizer(cfg.data.tokenizer))
    with caplog.at_level("INFO", logger="aimv2.pretraining.validation"):
        callback.setup(SimpleNamespace(global_rank=0, world_size=1), None, "fit")
    url = callback.ranges[1][0]
    with tarfile.open(url) as tar:
        fourth = tar.getmembers()[3]  # sample 1's first member, after sample 0's jpg, json and txt
    assert fourth.name.startswith("v000005.")
    assert callback.loader.dataset.starts == {(url, 1): (fourth.offset, "v000005")}
    assert (
        "an evaluation reads 10 tar samples (1.00x the set; 1.10x reading each shard from its start); "
        "indexed 1 shards at setup: 4 headers" in caplog.text
    )


def test_a_ranks_loader_with_workers_reads_its_slots_from_their_first_sample(seek_shards):
    ranges, tokenizer = seek_shards
    plan = plan_ranges(ranges, WORLD, WORKERS)
    slots = plan.slots
    index = index_ranges(slots)
    cost = read_cost(plan)
    process, collate = HeldOutProcessor(28, 16), HeldOutCollator(tokenizer)
    for rank in (1, 3):
        loader = every_sample_loader(plan, process, collate, 2, rank, index)
        got = list(loader)
        mine = slots[rank * WORKERS : (rank + 1) * WORKERS]
        assert sum(b["read"] for b in got) == sum(cost["per_slot_after"][rank * WORKERS : (rank + 1) * WORKERS])
        assert sum(b["image"].shape[0] + b["skipped"] for b in got) == sum(e - f for u in mine for _, f, e in u)
        # Without an index it indexes its own slots: the same batches.
        again = list(every_sample_loader(plan, process, collate, 2, rank))
        assert [int(b["read"]) for b in again] == [int(b["read"]) for b in got]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, got))


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 8])
def test_read_cost_at_the_recipes_scale(shards, workers):
    """10,000 held-out samples in 1, 2 or 4 shards, 256 ranks x 0 or 8 workers (256 or 2048 slots): an
    evaluation reads exactly the set; from each shard's start every slot read half a shard on average (to
    the end of its range: (slots per shard + 1) / 2 times the set)."""
    ranges = [(f"/held_out/{i:05d}.tar", 0, 10_000 // shards) for i in range(shards)]
    cost = read_cost(plan_ranges(ranges, 256, workers))
    slots = 256 * max(1, workers)
    assert cost["slots"] == slots and cost["after"] == cost["held_out"] == 10_000 and cost["after_ratio"] == 1.0
    assert cost["before_ratio"] == pytest.approx((slots / shards + 1) / 2, rel=0.01)
    assert cost["scan_shards"] == shards and cost["scan_samples"] < 10_000
