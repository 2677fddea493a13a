"""`aimv2 compress train CONFIG --rehearse`: the alignment config run as it is on this machine's CPU
for a few steps with a checkpoint and a resume (aimv2.engine.rehearsal).

Kept: the stage, the compressor (kind, M, widths), the prompt and prefix, the LM's architecture and
dtype when its directory is here, the optimizer, strategy, precision and every trainer switch. What a
laptop lacks stands in, said in the report: a random debug encoder at 224 px (16 x 16 patches, so
every M the compressors take at 224 px fits) for a missing `encoder.source`, a tiny random LM of the
configured `lm.arch` for a missing `lm.path`, the offline CLIP tokenizer for a missing tokenizer
directory, the demo shards for missing data, a fresh compressor for a missing `compressor.init`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from aimv2.compress.config import CompressConfig
from aimv2.engine.rehearsal import (
    RehearsalReport,
    check_gpu_strategy,
    demo_shard_urls,
    rehearsal_tokenizer,
    run_phases,
    shrink_trainer,
    unreadable,
)

STEPS = 2  # a checkpoint after step 1, resumed from there to 2
STAND_IN_RESOLUTION = 224


def rehearse_compress(
    cfg: CompressConfig,
    workdir: str | Path,
    devices: int | None = None,
    demo_root: str | Path | None = None,
    in_process: bool = False,
) -> RehearsalReport:
    """Rehearse `cfg` in WORKDIR (replaced); see aimv2.engine.rehearsal for `devices` and `in_process`."""
    workdir = Path(workdir).resolve()
    demo_root = Path(demo_root or workdir)
    report = RehearsalReport(cfg.run_dir)
    encoder = cfg.encoder
    if not cfg.encoder.source or not Path(cfg.encoder.source).exists():
        encoder = replace(encoder, source=str(_stand_in_encoder(demo_root)), img_size=0)
        report.add(
            "encoder",
            "changed",
            f"encoder.source {cfg.encoder.source!r} is not here: a random debug encoder "
            f"at {STAND_IN_RESOLUTION} px stands in",
        )
    else:
        report.add("encoder", "ok", f"{cfg.encoder.source}")
    lm = cfg.lm
    if not cfg.lm.path:
        report.add(
            "lm",
            "ok",
            f"a random {lm.arch} of width {lm.hidden_size}, {lm.num_layers} layers ({lm.dtype}): no lm.path is set",
        )
    elif Path(cfg.lm.path).is_dir():
        report.add("lm", "ok", f"{cfg.lm.path} ({cfg.lm.dtype})")
    else:
        lm = replace(lm, path="", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
        report.add(
            "lm",
            "changed",
            f"lm.path {cfg.lm.path!r} is not here: a random {lm.arch} of width 64, 2 layers ({lm.dtype}) stands in",
        )
    text = replace(cfg.text, tokenizer=rehearsal_tokenizer(cfg.text.tokenizer, report, "text.tokenizer"))
    compressor = cfg.compressor
    if cfg.compressor.init and not Path(cfg.compressor.init).exists():
        compressor = replace(compressor, init="")
        report.add("compressor", "changed", f"compressor.init {cfg.compressor.init!r} is not here: a fresh compressor")
    report.add(
        "compressor",
        "ok",
        f"stage {cfg.stage}, {cfg.compressor.kind}, M={cfg.compressor.num_tokens or 'N'}, prompt {cfg.text.prompt!r}",
    )
    data = replace(
        cfg.data,
        batch_size=min(cfg.data.batch_size, 2),
        num_workers=min(cfg.data.num_workers, 1),
        shuffle_buffer=min(cfg.data.shuffle_buffer, 64),
    )
    why = unreadable(cfg.data.train) or (cfg.data.val and unreadable(cfg.data.val))
    if why:
        demo = demo_shard_urls(demo_root)["pretrain"]
        data = replace(data, train=demo["urls"], val=demo["urls"])
        report.add("data", "changed", f"data.train/val not readable here ({why}): the demo set stands in")
    else:
        report.add("data", "ok", "the config's own shards")
    small = replace(
        cfg,
        run_dir=str(workdir / "run"),
        encoder=encoder,
        lm=lm,
        text=text,
        compressor=compressor,
        data=data,
        trainer=shrink_trainer(cfg.trainer, STEPS, devices, report),
    )
    check_gpu_strategy(cfg.trainer, report, workdir, cfg.optim.grad_clip)

    from aimv2.compress.train import train

    run_phases(small, train, ["compress", "train"], workdir, report, _read_attachment, in_process=in_process)
    return report


def _stand_in_encoder(root: Path) -> Path:
    """A randomly initialized debug encoder as an `aimv2` export directory (written once, reused)."""
    from aimv2.checkpoints.arch import recipe_from_size
    from aimv2.checkpoints.export import write_aimv2
    from aimv2.checkpoints.preprocessing import Preprocessing
    from aimv2.fileio import atomic_directory
    from aimv2.models.sizes import get_size

    out = root / f"stand_in_encoder_{STAND_IN_RESOLUTION}"
    if not (out / "config.json").is_file():
        recipe = recipe_from_size(get_size("debug"), STAND_IN_RESOLUTION)
        with atomic_directory(out, overwrite=True) as tmp:
            write_aimv2(tmp, recipe.build(), Preprocessing(STAND_IN_RESOLUTION), recipe)
    return out


def _read_attachment(ckpt: Path) -> str:
    from aimv2.compress.bundle import export_bundle
    from aimv2.compress.module import load_module
    from aimv2.engine.run_dir import RunDir

    module = load_module(str(ckpt))
    bundle = export_bundle(module, RunDir.of_checkpoint(ckpt).bundle, overwrite=True)
    return f"last.ckpt reloads (load_module) and exports as a bundle ({bundle.name}/)"
