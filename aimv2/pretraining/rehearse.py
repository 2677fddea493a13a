"""`aimv2 pretrain CONFIG --rehearse`: the pre-training config run as it is, shrunk to the debug size
on this machine's CPU (aimv2.engine.rehearsal says what is kept and what is shrunk)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aimv2.checkpoints import schema
from aimv2.config import DataConfig, PretrainConfig
from aimv2.config.schema import ValConfig
from aimv2.engine.rehearsal import (
    RehearsalReport,
    check_gpu_strategy,
    demo_shard_urls,
    rehearsal_tokenizer,
    run_phases,
    shrink_resolution,
    shrink_trainer,
    unreadable,
)
from aimv2.models.sizes import get_size

STEPS = 2  # a checkpoint after step 1, resumed from there to 2


def rehearse_pretrain(
    cfg: PretrainConfig,
    workdir: str | Path,
    devices: int | None = None,
    demo_root: str | Path | None = None,
    in_process: bool = False,
) -> RehearsalReport:
    """Rehearse `cfg` in WORKDIR (its run is replaced); `devices` caps the DDP processes (default 2);
    `demo_root` holds the demo shards that stand in for shards this machine cannot read;
    `in_process` runs one-device phases in this process (aimv2.engine.rehearsal.run_phases)."""
    workdir = Path(workdir).resolve()
    report = RehearsalReport(cfg.run_dir)
    spec = get_size(cfg.model.size)
    img = shrink_resolution(cfg.model.img_size, spec.patch_size)
    report.add("model", "changed", f"{cfg.model.size} at {cfg.model.img_size} px -> debug at {img} px")
    data = _shrink_data(cfg.data, Path(demo_root or workdir), report)
    model = replace(cfg.model, size="debug", img_size=img)
    if cfg.model.init_from:
        model = replace(model, init_from=str(_stand_in_stage(cfg, model, data, workdir, report)))
    small = replace(
        cfg,
        run_dir=str(workdir / "run"),
        model=model,
        data=data,
        trainer=shrink_trainer(cfg.trainer, STEPS, devices, report),
        visualize=replace(
            cfg.visualize,
            every_n_steps=STEPS if cfg.visualize.every_n_steps else 0,
            num_images=min(cfg.visualize.num_images, 2),
            max_caption_tokens=min(cfg.visualize.max_caption_tokens, 2),
            images=[p for p in cfg.visualize.images if Path(p).exists()],
        ),
    )
    t = cfg.trainer
    report.add(
        "recipe",
        "ok",
        f"precision {t.precision}, accumulate {t.accumulate_grad_batches}, clip "
        f"{cfg.optim.grad_clip}, activation checkpointing {t.activation_checkpointing}, "
        f"compile {t.compile}, global batch {_global_batch(cfg)} as configured",
    )
    check_gpu_strategy(t, report, workdir, cfg.optim.grad_clip)

    from aimv2.pretraining.pretrain import pretrain

    run_phases(small, pretrain, ["pretrain"], workdir, report, _read_encoder, in_process=in_process)
    return report


def _shrink_data(d: DataConfig, demo_root: Path, report: RehearsalReport) -> DataConfig:
    """The config's own shards when this machine can read them all; otherwise the demo set stands in
    for every source (names, weights and mode kept, so the mixture has the configured shape)."""
    reasons = [unreadable(src.urls) for src in d.sources]
    sources, words = d.sources, None
    if any(reasons):
        demo = demo_shard_urls(demo_root)
        first = next(r for r in reasons if r)
        sources, words = [replace(src, urls=demo["pretrain"]["urls"]) for src in d.sources], demo["vocabulary"]
        report.add(
            "data",
            "changed",
            f"{sum(map(bool, reasons))} of {len(reasons)} sources not readable here "
            f"({first}): the demo set stands in for each; {d.mode} mode, "
            f"weights {[s.weight for s in d.sources]} kept",
        )
    else:
        report.add("data", "ok", f"the config's own {len(sources)} source(s), {d.mode} mode")
    return replace(
        d,
        sources=sources,
        batch_size=min(d.batch_size, 2),
        num_workers=min(d.num_workers, 1),
        shuffle_buffer=min(d.shuffle_buffer, 64),
        val=_shrink_val(d.val, demo_root, report),
        tokenizer=rehearsal_tokenizer(d.tokenizer, report, "data.tokenizer", words),
    )


def _shrink_val(val: ValConfig, demo_root: Path, report: RehearsalReport) -> ValConfig:
    """The held-out validation loss runs as configured (at least at the last step), on 8 samples: of the
    config's own held-out shards when this machine can read them, else of the demo set."""
    if not val.urls:
        return val
    reason = unreadable(val.urls)
    if reason:
        urls = demo_shard_urls(demo_root)["pretrain"]["urls"]
        report.add("data.val", "changed", f"held-out shards not readable here ({reason}): the demo set stands in")
    else:
        urls = val.urls
        report.add("data.val", "ok", "the config's own held-out shards")
    return replace(
        val,
        urls=urls,
        max_samples=min(val.max_samples or 8, 8),
        batch_size=min(val.batch_size or 2, 2),
        num_workers=min(val.num_workers, 1),
    )


def _stand_in_stage(cfg: PretrainConfig, model, data: DataConfig, workdir: Path, report: RehearsalReport) -> Path:
    """A debug checkpoint of an earlier, lower-resolution stage for `model.init_from` (the real one is of
    another size, and usually not on this machine): the rehearsal then resamples its encoder and loads
    its decoder exactly as the real stage will."""
    import lightning
    import torch

    from aimv2.data.tokenizer import build_tokenizer
    from aimv2.pretraining.module import AIMv2PretrainModule

    patch = get_size("debug").patch_size
    earlier = max(2 * patch, model.img_size - 2 * patch)
    tokenizer = build_tokenizer(data.tokenizer)
    torch.manual_seed(0)
    stand_in = AIMv2PretrainModule(
        {"size": "debug", "img_size": earlier},
        cfg.objective,
        cfg.optim,
        vocab_size=tokenizer.vocab_size,
        max_text_len=data.tokenizer.max_length,
    )
    path = workdir / "stand_in_stage.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": stand_in.state_dict(),
        "hyper_parameters": dict(stand_in.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    schema.write(checkpoint, job="pretrain")
    torch.save(checkpoint, path)
    here = (
        "is on this machine" if Path(cfg.model.init_from).exists() else "is not here yet (the earlier stage writes it)"
    )
    report.add(
        "init_from",
        "changed",
        f"model.init_from {cfg.model.init_from} {here}: a debug checkpoint at {earlier} px "
        f"stands in (encoder resampled to {model.img_size} px, decoder loaded)",
    )
    return path


def _global_batch(cfg: PretrainConfig) -> str:
    from aimv2.engine.launch_checks import device_count

    per_node = device_count(cfg.trainer.devices)
    native = cfg.model.native and cfg.data.mode == "resampled"  # batches of tokens, not of images
    unit = cfg.data.native.rows * cfg.data.native.row_tokens if native else cfg.data.batch_size
    suffix = " encoder tokens (native rows x row_tokens)" if native else ""
    if per_node is None:
        return f"{unit} x devices{suffix}"
    return f"{unit * per_node * cfg.trainer.num_nodes * cfg.trainer.accumulate_grad_batches}{suffix}"


def _read_encoder(ckpt: Path) -> str:
    import torch

    from aimv2 import load_encoder

    encoder, pre = load_encoder(ckpt)
    with torch.no_grad():
        tokens = encoder.forward_features(torch.zeros(1, 3, pre.img_size, pre.img_size))
    return f"last.ckpt loads as a timm encoder (load_encoder): features {tuple(tokens.shape)}"
