"""Step parity with Apple's reference trainer, ml-l3m: the same weights and batches through both.

    python eval/parity_l3m.py PATH_TO_ML_L3M                     # step parity -> eval/results/parity_l3m.{md,json}
    python eval/parity_l3m.py PATH_TO_ML_L3M --training          # training parity (demo data, 3 seeds, probes)

PATH_TO_ML_L3M is a checkout of github.com/apple/ml-l3m fetched by the user, driven by eval/l3m_reference.py;
nothing of it is copied here and CI does not run this. Its model, loss and optimizer need `hydra-core` and
`fvcore` besides what this project installs (`pip install hydra-core fvcore`); the script says so if they are missing.

Step parity. ml-l3m's AIMv2 is built by Hydra from its own configs/aimv2/001_aimv2_hfdata.yaml with only
its `constants` shrunk (widths, depths, heads, vocabulary, caption length, and the image size when not
224); this project's `AIMv2PretrainModule` is built at the same size. Their weights are copied into
ours by `aimv2.checkpoints.convert.l3m_to_module`; both get the same images, caption tokens and prefix
lengths (ours draws them from each batch's seed, theirs receives the same as its `encoder_prefix_mask`).
Compared in fp32: both loss terms, every gradient (through the same name map), and every weight after
`--steps` optimizer steps of each trainer's own optimizer and schedule with clipping 1.0: theirs is
AdamLH with their `fvcore` warmup-cosine and their loop (src/l3m/engine.py: schedule, forward, loss,
backward, clip, step), ours a Lightning `Trainer.fit` of the real module (AdamW with the decoupled
decay, `warmup_cosine_schedule`, `ClipGradientNorm`).

Caption convention. Their shipped tokenizer (SigLIP's) ends a caption with id 1, which is also its pad
id and the loss's `ignore_index`: the end of a caption is never a target. The batches here follow it (ids
>= 2 for words, 1 after them) and ours is given `token_mask = tokens != 1`, the same targets. (This
project's tokenizers count their end-of-text token as one more target per caption.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aimv2.fileio import markdown_table  # noqa: E402
from l3m_reference import (  # noqa: E402
    PAD,
    build_l3m,
    import_l3m,
    l3m_config,
    l3m_optimizer,
    l3m_step,
    l3m_terms,
    train_l3m,
)

# -- this project -------------------------------------------------------------------------------------


def our_module(
    size: str, img_size: int, vocab: int, text_len: int, lr: float, weight_decay: float, warmup: int, min_lr: float
):
    from aimv2.config import ModelConfig, ObjectiveConfig, OptimConfig
    from aimv2.pretraining.module import AIMv2PretrainModule

    return AIMv2PretrainModule(
        ModelConfig(size=size, img_size=img_size),
        ObjectiveConfig(alpha=0.4),
        OptimConfig(lr=lr, min_lr=min_lr, weight_decay=weight_decay, warmup_steps=warmup, betas=(0.9, 0.95), eps=1e-8),
        vocab_size=vocab,
        max_text_len=text_len,
    )


def our_batch(batch: dict) -> dict:
    return {
        "image": batch["image"],
        "tokens": batch["tokens"],
        "token_mask": batch["tokens"] != PAD,
        "seed": batch["seed"],
        "skipped": torch.zeros((), dtype=torch.long),
        "shard_errors": torch.zeros((), dtype=torch.long),
    }


def our_terms(module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(int(batch["seed"]))
    losses, _ = module._losses(our_batch(batch), generator)
    return losses.total, losses.image, losses.text


def fit_ours(module, batches: list[dict], clip: float) -> list[float]:
    """`--steps` optimizer steps through Lightning, as `aimv2 pretrain` trains; returns each step's lr."""
    import lightning as L

    class Record(L.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, *_):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    record = Record()
    trainer = L.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        devices=1,
        precision="32-true",
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[record],
    )
    loader = torch.utils.data.DataLoader([our_batch(b) for b in batches], batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return record.lrs


# -- batches and comparison ---------------------------------------------------------------------------


def make_batches(
    count: int, batch_size: int, img_size: int, patch: int, vocab: int, text_len: int, seed: int = 0
) -> list[dict]:
    """Images like normalized pixels, captions of 3..text_len-1 words (ids >= 2) then PAD, and each batch's
    prefix lengths drawn as the pre-training module draws them from the batch's seed."""
    from aimv2.models.masks import sample_prefix_lengths

    g = torch.Generator().manual_seed(seed)
    num_patches = (img_size // patch) ** 2
    batches = []
    for k in range(count):
        images = torch.randn(batch_size, 3, img_size, img_size, generator=g)
        tokens = torch.full((batch_size, text_len), PAD, dtype=torch.long)
        for row in range(batch_size):
            n = int(torch.randint(3, text_len, (1,), generator=g))
            tokens[row, :n] = torch.randint(2, vocab, (n,), generator=g)
        batch_seed = 1000 * seed + k
        prefix = sample_prefix_lengths(batch_size, num_patches, generator=torch.Generator().manual_seed(batch_seed))
        batches.append(
            {"image": images, "tokens": tokens, "seed": batch_seed, "prefix": prefix, "num_patches": num_patches}
        )
    return batches


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs| (0 when both are 0)."""
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    return diff / scale if scale > 0 else diff


def norm_relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """||ours - theirs|| / ||theirs|| (Frobenius; 0 when both are 0)."""
    scale = theirs.double().norm().item()
    diff = (ours.double() - theirs.double()).norm().item()
    return diff / scale if scale > 0 else diff


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """The largest relative differences (elementwise max and norm) over the tensors both hold, and where."""
    missing = sorted(set(ours) ^ set(theirs))
    if missing:
        raise SystemExit(f"parity_l3m: the name map leaves tensors unmatched: {missing[:6]}")
    by_max = {name: relative(ours[name], theirs[name]) for name in ours}
    by_norm = {name: norm_relative(ours[name], theirs[name]) for name in ours}
    worst, worst_norm = max(by_max, key=by_max.get), max(by_norm, key=by_norm.get)
    return {
        "largest_relative": by_max[worst],
        "where": worst,
        "largest_norm_relative": by_norm[worst_norm],
        "norm_where": worst_norm,
        "tensors": len(by_max),
    }


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def step_parity(args) -> dict:
    from aimv2.checkpoints.convert import l3m_to_module
    from aimv2.engine.optim import clean_name
    from aimv2.models import get_size

    import_l3m(args.l3m)
    torch.manual_seed(args.seed)
    spec = get_size(args.size)
    cfg = l3m_config(args.l3m, spec, args.img_size, args.vocab, args.text_len)
    theirs, loss_fn = build_l3m(cfg)
    lr, lam = float(cfg.optim.optimizer.lr), float(cfg.optim.optimizer.weight_decay)
    min_lr = float(cfg.optim.scheduler.schedulers[1].end_value)
    module = our_module(args.size, args.img_size, args.vocab, args.text_len, lr, lam, args.warmup, min_lr)
    ours = module.model
    mapped = lambda state: l3m_to_module(state, args.text_len)  # noqa: E731
    ours.load_state_dict(mapped(theirs.state_dict()), strict=True)
    batches = make_batches(args.steps, args.batch, args.img_size, spec.patch_size, args.vocab, args.text_len, args.seed)

    # 1. losses and gradients on the first batch
    t_total, t_image, t_text = l3m_terms(theirs, loss_fn, batches[0])
    o_total, o_image, o_text = our_terms(module, batches[0])
    t_total.backward()
    o_total.backward()
    their_grads = mapped({n: p.grad for n, p in theirs.named_parameters() if p.grad is not None})
    # their last caption position feeds no loss (see l3m_to_module): its row has a zero gradient
    pos = dict(theirs.named_parameters())["models.text_decoder.preprocessor.text_preprocessor.positional_embedding"]
    unused_row_grad = pos.grad[args.text_len :].abs().max().item()
    gradients = compare(grads_of(ours), their_grads)
    losses = {
        name: {"ours": o.item(), "ml-l3m": t.item(), "relative": abs(o.item() - t.item()) / abs(t.item())}
        for name, o, t in (("total", o_total, t_total), ("image", o_image, t_image), ("text", o_text, t_text))
    }
    theirs.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)

    # 2. the same parameters decayed: theirs by their wd_exclude patterns, ours by no_decay_names
    from l3m.optim.optimizer import get_param_groups

    groups, _ = get_param_groups(theirs, lam, list(cfg.optim.wd_exclude))
    ids = {id(p): n for n, p in theirs.named_parameters()}
    their_decayed = set(mapped({ids[id(p)]: p for p in groups[0]["params"]}))
    our_decayed = {n for n, p in ours.named_parameters() if clean_name(n) not in module._no_decay}
    decay_sets_equal = their_decayed == our_decayed

    # 3. weights after `steps` steps of each trainer
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    control, _ = build_l3m(cfg)
    control.load_state_dict(theirs.state_dict())
    optimizer, scheduler = l3m_optimizer(theirs, cfg, args.steps, args.warmup)
    t0 = time.perf_counter()
    their_log = [l3m_step(theirs, loss_fn, optimizer, scheduler, b, i, args.steps, 1.0) for i, b in enumerate(batches)]
    their_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    our_lrs = fit_ours(module, batches, clip=1.0)
    our_seconds = time.perf_counter() - t0
    c_optimizer, c_scheduler = l3m_optimizer(control, cfg, args.steps, args.warmup)
    jitter = torch.Generator().manual_seed(args.seed + 1)
    for i, b in enumerate(batches):
        l3m_step(control, loss_fn, c_optimizer, c_scheduler, b, i, args.steps, 1.0, jitter=jitter)
    final_theirs = mapped({n: p.detach() for n, p in theirs.named_parameters()})
    final_ours = {n: p.detach() for n, p in ours.named_parameters()}
    final_control = mapped({n: p.detach() for n, p in control.named_parameters()})
    weights = compare(final_ours, final_theirs)
    weights_control = compare(final_control, final_theirs)
    # the same differences measured against how far each weight moved (the updates' own relative error)
    moved = {n: final_theirs[n] - start[n] for n in final_ours}
    updates = compare({n: final_ours[n] - start[n] for n in moved}, moved)
    updates_control = compare({n: final_control[n] - start[n] for n in moved}, moved)
    lr_rel = max(abs(a - b["lr"]) / b["lr"] for a, b in zip(our_lrs, their_log))
    return {
        "command": "python eval/parity_l3m.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
        "img_size": args.img_size,
        "batch": args.batch,
        "vocab": args.vocab,
        "text_len": args.text_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": lr,
        "weight_decay": lam,
        "losses": losses,
        "gradients": gradients,
        "unused_position_row_grad": unused_row_grad,
        "decayed_sets_equal": decay_sets_equal,
        "decayed": len(our_decayed),
        "lrs": {"ours": our_lrs, "ml-l3m": [r["lr"] for r in their_log], "largest_relative": lr_rel},
        "weights": weights,
        "updates": updates,
        "control": {"weights": weights_control, "updates": updates_control},
        "their_losses": [r["loss"] for r in their_log],
        "seconds": {"ml-l3m": their_seconds, "ours": our_seconds},
    }


def step_report(r: dict) -> str:
    def cells(c: dict) -> list[str]:
        return [
            f"{c['largest_relative']:.1e} (`{c['where']}`)",
            f"{c['largest_norm_relative']:.1e} (`{c['norm_where']}`)",
        ]

    g, lrs, n = r["gradients"], r["lrs"], r["steps"]
    rows = [
        [f"loss, {k}", f"{v['ours']:.6f}", f"{v['ml-l3m']:.6f}", f"{v['relative']:.1e}", ""]
        for k, v in r["losses"].items()
    ]
    rows += [
        [f"every gradient, first batch ({g['tensors']} tensors)", "", "", *cells(g)],
        [f"learning rate at each of the {n} steps", "", "", f"{lrs['largest_relative']:.1e}", ""],
        [f"every weight after {n} steps", "", "", *cells(r["weights"])],
        [f"every weight's change over the {n} steps", "", "", *cells(r["updates"])],
        [
            "control: ml-l3m against itself with its gradients x (1 + 1e-7 N(0,1)), weights",
            "",
            "",
            *cells(r["control"]["weights"]),
        ],
        ["control, weight changes", "", "", *cells(r["control"]["updates"])],
    ]
    return "\n".join(
        [
            "# Step parity with ml-l3m",
            "",
            f"`{r['command']}`",
            "",
            f"Machine: {r['machine']}; {r['date']}. Size `{r['size']}` at {r['img_size']} px, batch {r['batch']}, "
            f"vocabulary {r['vocab']}, captions of {r['text_len']} positions; fp32. ml-l3m's AIMv2 from its own "
            "configs/aimv2/001_aimv2_hfdata.yaml (constants shrunk), its weights copied into ours "
            "(`aimv2.checkpoints.convert.l3m_to_module`); each trainer then takes its own "
            f"{n} steps (lr {r['lr']:g}, weight decay {r['weight_decay']:g}, warmup {r['warmup']}, clip 1.0).",
            "",
            markdown_table(["quantity", "ours", "ml-l3m", "largest relative difference, elementwise", "by norm"], rows),
            "",
            "Elementwise: max |ours - theirs| / max |theirs| per tensor; by norm: ||ours - theirs|| / ||theirs||; "
            f"each the largest over tensors. Decayed parameters identical: {r['decayed_sets_equal']} ({r['decayed']} "
            "tensors; theirs by `wd_exclude`, ours by `no_decay_names`). The gradient of their caption position row "
            f"that no loss reads: {r['unused_position_row_grad']:.1e}.",
            "",
            "Learning rates per step: ours "
            + ", ".join(f"{x:.3g}" for x in lrs["ours"])
            + "; ml-l3m "
            + ", ".join(f"{x:.3g}" for x in lrs["ml-l3m"])
            + ".",
            "",
            reading(r),
        ]
    )


def reading(r: dict) -> str:
    """What the figures say, each quantity against 1e-5, the weights against the control's floor."""
    g, w, c = r["gradients"], r["weights"], r["control"]["weights"]
    worst_loss = max(v["relative"] for v in r["losses"].values())
    lines = [
        f"Reading. Losses: {worst_loss:.1e} apart; gradients: {g['largest_relative']:.1e}, float32 rounding "
        "(timm's fused qkv against three matrices, other summation orders); learning rates: "
        f"{r['lrs']['largest_relative']:.1e}."
    ]
    if w["largest_relative"] <= 1e-5:
        lines.append(f"Weights after {r['steps']} steps: {w['largest_relative']:.1e}, under 1e-5.")
    elif w["largest_relative"] <= 3 * c["largest_relative"]:
        lines.append(
            f"Weights after {r['steps']} steps: {w['largest_relative']:.1e} elementwise, over 1e-5, and "
            f"{w['largest_norm_relative']:.1e} by norm. The control explains it: ml-l3m differs from itself by "
            f"{c['largest_relative']:.1e} ({c['largest_norm_relative']:.1e} by norm) when only its gradients are "
            "perturbed at float32 rounding's size. Adam divides each moment by sqrt(v) + eps, so an element whose "
            "gradient is near eps (1e-8; a token embedding row a batch touches once) moves by an amount its "
            "rounding decides; the difference sits in the same tensor and is the floor of 10 fp32 Adam steps, "
            "not a difference in what the two trainers compute."
        )
    else:
        lines.append(
            f"Weights after {r['steps']} steps: {w['largest_relative']:.1e}, over 3x the control's "
            f"{c['largest_relative']:.1e}: a real difference, to be found."
        )
    return " ".join(lines) + "\n"


# -- training parity ----------------------------------------------------------------------------------


def demo_config(out: Path, seed: int, steps: int, run_dir: Path):
    """The demo's pre-training config (configs/pretrain/demo.yaml on the demo digits) for one seed."""
    from aimv2.config import load_config
    from aimv2.data.demo import build_demo_shards
    from aimv2.shipped import shipped_config

    demo = build_demo_shards(out / "data")
    cfg = load_config(
        shipped_config("pretrain/demo.yaml"),
        [
            f"data.sources=[{{name: demo_digits, urls: '{demo['pretrain']['urls']}'}}]",
            f"data.tokenizer.path={demo['vocabulary']}",
            f"run_dir={run_dir}",
            f"trainer.max_steps={steps}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            "trainer.progress_bar=false",
            "visualize.every_n_steps=0",
            f"trainer.checkpoint_every_n_steps={steps}",
            "trainer.overwrite=true",
        ],
    )
    return cfg, demo


def probe(
    cfg_overrides: list[str], demo: dict, run_dir: Path, checkpoint: Path, encoder=None, preprocessing=None
) -> dict:
    """The demo's probe (configs/probe/toy.yaml, cached, linear and attentive grids) of an encoder."""
    from aimv2.config import load_config
    from aimv2.probe.config import ProbeConfig
    from aimv2.probe.run import run_probe
    from aimv2.shipped import shipped_config

    cfg = load_config(
        shipped_config("probe/toy.yaml"),
        [
            f"checkpoint={checkpoint}",
            f"data.train={demo['probe_train']['dir']}",
            f"data.val={demo['probe_val']['dir']}",
            f"run_dir={run_dir}",
            "accelerator=cpu",
            "progress_bar=false",
            *cfg_overrides,
        ],
        schema=ProbeConfig,
    )
    results = run_probe(cfg, encoder=encoder, preprocessing=preprocessing)
    return {kind: row["top1"] for kind, row in results["best_per_kind"].items()}


def training_parity(args) -> dict:
    from aimv2.checkpoints.loading import load_checkpoint
    from aimv2.engine.checkpointing import InitialCheckpoint
    from aimv2.engine.logs import read_metric
    from aimv2.engine.run_dir import RunDir
    from aimv2.models import AIMv2, get_size
    from aimv2.pretraining.pretrain import pretrain

    import_l3m(args.l3m)
    work = args.work.resolve()
    rows = []
    for seed in args.seeds:
        cfg, demo = demo_config(work, seed, args.train_steps, work / f"ours_seed{seed}")
        started = time.perf_counter()
        run = pretrain(cfg, callbacks=[InitialCheckpoint(RunDir(cfg.run_dir).checkpoints)])
        our_seconds = time.perf_counter() - started
        ours = probe([], demo, work / f"ours_seed{seed}" / "probe", run.last_checkpoint)
        initial = probe(
            [], demo, work / f"ours_seed{seed}" / "probe_random_init", RunDir(cfg.run_dir).step_checkpoint(0)
        )
        theirs_trained = train_l3m(args.l3m, cfg, seed)
        loaded = load_checkpoint(run.last_checkpoint)  # the same architecture and preprocessing as ours
        vocab = theirs_trained["state"]["decoder.text_embed.weight"].shape[0]
        model = AIMv2(get_size(cfg.model.size), cfg.model.img_size, vocab, cfg.data.tokenizer.max_length)
        model.load_state_dict(theirs_trained["state"], strict=True)
        theirs = probe(
            [],
            demo,
            work / f"l3m_seed{seed}" / "probe",
            run.last_checkpoint,
            encoder=model.encoder,
            preprocessing=loaded.preprocessing,
        )
        logged = [v for _, v in read_metric(run.metrics, "train/loss")][-5:]  # logged every 10 steps: the last 50
        rows.append(
            {
                "seed": seed,
                "ours": ours,
                "ml-l3m": theirs,
                "random init": initial,
                "final_loss_ours": sum(logged) / len(logged),
                "seconds": {"ours": our_seconds, "ml-l3m": theirs_trained["seconds"]},
                "final_loss_l3m": theirs_trained["final_loss"],
            }
        )
        print(f"seed {seed}: ours {ours}, ml-l3m {theirs}", flush=True)
    return {
        "command": "python eval/parity_l3m.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.train_steps,
        "seeds": rows,
    }


def training_report(r: dict) -> str:
    import statistics

    def cell(values: list[float], digits: int = 2) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    kinds = sorted(r["seeds"][0]["ours"])
    lines = [
        "# Training parity with ml-l3m",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {r['machine']}; {r['date']}. The demo's pre-training (configs/pretrain/demo.yaml: debug size, "
        f"56 px, demo digits) for {r['steps']} steps, once by `aimv2 pretrain` and once by ml-l3m's model, loss, "
        "AdamLH and schedule in their loop on the same stream's batches; both encoders probed by the demo's probe "
        "(configs/probe/toy.yaml). Top-1 (%) on the held-out digits, mean ± sample std over seeds; "
        "`random init` is "
        "our run's step-0 checkpoint.",
        "",
        markdown_table(
            ["trainer", *kinds],
            [
                [name] + [cell([s[name][k] for s in r["seeds"]]) for k in kinds]
                for name in ("ours", "ml-l3m", "random init")
            ],
        ),
    ]
    lines += [
        "",
        "Training loss (total, mean of the last 50 steps): ours "
        + cell([s["final_loss_ours"] for s in r["seeds"]], 3)
        + ", ml-l3m "
        + cell([s["final_loss_l3m"] for s in r["seeds"]], 3)
        + ".",
    ]
    verdicts = []
    for k in kinds:
        ours, theirs = [s["ours"][k] for s in r["seeds"]], [s["ml-l3m"][k] for s in r["seeds"]]
        gap = statistics.mean(ours) - statistics.mean(theirs)
        spread = max(statistics.stdev(ours), statistics.stdev(theirs)) if len(ours) > 1 else float("nan")
        verdicts.append(
            f"{k} {gap:+.2f} points ({'within' if abs(gap) <= spread else 'outside'} the larger seed std, {spread:.2f})"
        )
    lines += ["", "Gap, ours - ml-l3m: " + "; ".join(verdicts) + "."]
    lines += [
        "",
        "Per seed: "
        + "; ".join(
            f"seed {s['seed']}: ours "
            + ", ".join(f"{k} {s['ours'][k]:.2f}" for k in kinds)
            + " / ml-l3m "
            + ", ".join(f"{k} {s['ml-l3m'][k]:.2f}" for k in kinds)
            for s in r["seeds"]
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("l3m", type=Path, help="a checkout of github.com/apple/ml-l3m")
    parser.add_argument(
        "--size",
        default="tiny",
        help="a row of the size table (default tiny: their SwiGLU rounding gives its widths unchanged)",
    )
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--training", action="store_true", help="training parity instead of step parity")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=2000, help="training parity: steps (the demo's 2000)")
    parser.add_argument("--work", type=Path, default=Path("runs/parity_l3m"), help="training parity: run directories")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix (default eval/results/parity_l3m[_training])",
    )
    args = parser.parse_args(argv)
    args.l3m = args.l3m.resolve()
    out = args.out or REPO / "eval" / "results" / ("parity_l3m_training" if args.training else "parity_l3m")
    result = training_parity(args) if args.training else step_parity(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    report = training_report(result) if args.training else step_report(result)
    out.with_suffix(".md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
