"""Native resolution: fixed 2-D sin-cos positions against a learned table resampled to each grid.

The issue behind aimv2.models.native asked for "position information that works at any grid (Apple's
native release uses 2D sin-cos; resampled learned tables are the alternative: measure and choose)".
This trains configs/pretrain/debug_native.yaml on the demo set twice per seed, identical but for the
position term:

  sincos   the shipped SinCosPatchEmbed / encode_packed (aimv2.models.native), untouched;
  learned  a learned (1, gh0, gw0, D) table at the config's nominal grid (model.img_size / patch:
           4 x 4 for the debug config; --table-grid to change it), bicubic-resampled (antialiased,
           timm's resample_abs_pos_embed_nhwc, what a fixed-size timm ViT does with dynamic_img_size)
           to each image's own grid; init normal(0.02), no weight decay, as the fixed-size model's.

Training goes through the real `aimv2.pretraining.pretrain.pretrain(cfg)` (data stream, packing,
prefix draws, AdamW, schedule, clipping): the learned variant only swaps the module class it builds
(`ResampledModule`) and routes `AIMv2.forward_packed`'s encoder call through `encode_packed_any`,
which hands the sin-cos encoder to the shipped `encode_packed` and mirrors it for the learned one.
Same seed (trainer.seed = data.seed), same data order, same steps: every weight but the table starts
equal (the table is drawn after the model is built).

Evaluation on the held-out digits (probe/val, never in pre-training) resized to fixed grids: the
pre-training losses with the captions `aimv2 shards demo` drew for them (it writes captions for the
pretrain split only; `heldout_captions` replays its draw and checks it against the pretrain shards),
and a linear probe (logistic regression on mean-pooled final features, fit on probe/train at the same
grid), for the trained encoders and their random inits.

  OMP_NUM_THREADS=1 .venv/bin/python eval/native_positions.py --steps 2000 --seeds 0 1 2   # ~11 min

writes eval/results/native_positions.{json,md}; `--report-only` re-renders the .md from the .json.
One torch thread: on a shared 2-core machine two threads plus the two data workers oversubscribe the
cores (the probe's 300 small AdamW steps took 21 s instead of 0.3 s).
"""

from __future__ import annotations

import argparse
import collections
import copy
import csv
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from timm.layers import PatchEmbed, resample_abs_pos_embed_nhwc
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import aimv2.models.aimv2 as aimv2_model
import aimv2.pretraining.pretrain as pretrain_mod
from aimv2.config import load_config
from aimv2.data.native import PackedCollator, Packing, place_rows
from aimv2.data.samples import decode_image_tensor, normalize_images, normalize_patch_pixels
from aimv2.data.tokenizer import build_tokenizer
from aimv2.engine.optim import no_decay_names
from aimv2.fileio import markdown_table
from aimv2.models.masks import as_bias, packed_encoder_mask, sample_prefix_lengths
from aimv2.models.native import SinCosPatchEmbed, encode_packed, patch_kernel
from aimv2.objective import aimv2_loss
from aimv2.pretraining.module import AIMv2PretrainModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/pretrain/debug_native.yaml"
GRIDS = ((4, 4), (5, 4), (3, 6), (6, 3), (6, 6), (8, 8))
VARIANTS = ("sincos", "learned")


# -- the learned, resampled position table -------------------------------------------------------
class ResampledPatchEmbed(SinCosPatchEmbed):
    """timm's patch embedding plus a learned table `pos_embed` (1, gh0, gw0, D) resampled to the grid
    at hand; a subclass of SinCosPatchEmbed only so that is_native() and the packed path accept it."""

    pos_embed: nn.Parameter

    def table(self, gh: int, gw: int) -> torch.Tensor:
        return resample_abs_pos_embed_nhwc(self.pos_embed, [gh, gw])[0]  # (gh, gw, D); same size: as is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = PatchEmbed.forward(self, x)  # (B, gh, gw, D), without the sin-cos term
        return x + self.table(x.shape[1], x.shape[2]).to(x.dtype)

    def packed_positions(self, coords: torch.Tensor) -> torch.Tensor:
        """(R, T, D) for packed coords (R, T, 2): each token gets its own image's resampled table at its
        (row, column). The images of a row are contiguous and each starts at (0, 0) (pack_layout), so
        (0, 0) marks a new image and its grid is its largest (row, column) + 1; a padding token
        (coords 0, 0) is a 1 x 1 image of its own, whose output is ignored."""
        flat = coords.reshape(-1, 2)
        image = (flat == 0).all(-1).long().cumsum(0) - 1  # row 0 starts at (0, 0): ids from 0
        grid = torch.zeros(int(image[-1]) + 1, 2, dtype=torch.long)
        grid = grid.scatter_reduce(0, image[:, None].expand(-1, 2), flat, "amax", include_self=True)[image] + 1
        out = self.pos_embed.new_zeros(flat.shape[0], self.pos_embed.shape[-1])
        for gh, gw in torch.unique(grid, dim=0).tolist():
            sel = (grid[:, 0] == gh) & (grid[:, 1] == gw)
            out = out.index_put((sel.nonzero()[:, 0],), self.table(gh, gw)[flat[sel, 0], flat[sel, 1]])
        return out.view(*coords.shape[:-1], -1)


def encode_packed_any(encoder, patches, coords, attn_mask):
    """aimv2.models.native.encode_packed for the shipped encoder; the same steps with the learned,
    resampled term for ResampledPatchEmbed."""
    embed = encoder.patch_embed
    if not isinstance(embed, ResampledPatchEmbed):
        return encode_packed(encoder, patches, coords, attn_mask)
    x = embed.norm(F.linear(patches, patch_kernel(encoder), embed.proj.bias))
    x = encoder.norm_pre(x + embed.packed_positions(coords).to(x.dtype))
    for block in encoder.blocks:
        x = block(x, attn_mask=attn_mask)
    return encoder.norm(x)


aimv2_model.encode_packed = encode_packed_any  # what AIMv2.forward_packed calls (this process only)
TABLE_GRID: tuple[int, int] | None = None  # --table-grid; None: the nominal grid


class ResampledModule(AIMv2PretrainModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        embed = self.model.encoder.patch_embed
        embed.__class__ = ResampledPatchEmbed
        embed.pos_embed = nn.Parameter(torch.empty(1, *(TABLE_GRID or embed.grid_size), embed.proj.out_channels))
        nn.init.normal_(embed.pos_embed, std=0.02)
        self._no_decay = no_decay_names(self.model)
        assert "encoder.patch_embed.pos_embed" in self._no_decay


# -- training -----------------------------------------------------------------------------------
class KeepModels(Callback):
    def on_train_start(self, trainer, pl_module):
        self.init = copy.deepcopy(pl_module.model).eval()

    def on_train_end(self, trainer, pl_module):
        self.final = pl_module.model.eval()


def train(variant: str, seed: int, steps: int, workdir: Path) -> dict:
    cfg = load_config(
        str(CONFIG),
        [
            f"run_dir={workdir / f'{variant}_{seed}'}",
            f"trainer.max_steps={steps}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            "trainer.progress_bar=false",
            f"trainer.checkpoint_every_n_steps={steps}",
            "trainer.keep_checkpoints=1",
        ],
    )
    keep, start = KeepModels(), time.time()
    module_cls = ResampledModule if variant == "learned" else AIMv2PretrainModule
    with mock.patch.object(pretrain_mod, "AIMv2PretrainModule", module_cls):
        run = pretrain_mod.pretrain(cfg, callbacks=[keep])
    with open(run.metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_img")]
    last = rows[-5:]  # the last 50 logged steps
    return {
        "init": keep.init,
        "final": keep.final,
        "seconds": time.time() - start,
        "cfg": cfg,
        "train_image": float(np.mean([float(r["train/loss_img"]) for r in last])),
        "train_text": float(np.mean([float(r["train/loss_text"]) for r in last])),
    }


# -- held-out data ------------------------------------------------------------------------------
def read_shards(directory: Path) -> dict[str, dict]:
    samples: dict[str, dict] = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def heldout_captions(data_dir: Path) -> dict[str, str]:
    """Every digit's caption as build_demo_shards drew it (its render loop replayed), checked against
    the captions it wrote into the pretrain shards."""
    from sklearn.datasets import load_digits

    from aimv2.data import demo

    params = json.loads((data_dir / "demo.json").read_text())["params"]
    _, rng, _ = (np.random.default_rng(s) for s in np.random.SeedSequence(params["seed"]).spawn(3))
    digits, captions = load_digits(), {}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target.astype(int))):
        _, ink, paper = demo._render(pixels, rng, params["image_size"])
        template = demo._TEMPLATES[rng.integers(len(demo._TEMPLATES))]
        captions[f"{i:09d}"] = template.format(word=demo.DIGIT_NAMES[label], digit=int(label), ink=ink, paper=paper)
    written = {k: s["txt"].decode() for k, s in read_shards(data_dir / "pretrain").items()}
    if any(captions[k] != c for k, c in written.items()):
        raise RuntimeError("the replayed captions differ from the pretrain shards' (aimv2.data.demo changed?)")
    return captions


def load_split(directory: Path, captions: dict[str, str] | None = None) -> dict:
    samples = read_shards(directory)
    keys = sorted(samples)
    return {
        "images": torch.stack([decode_image_tensor(samples[k]) for k in keys]),
        "labels": torch.tensor([int(samples[k]["cls"]) for k in keys]),
        "captions": [captions[k] for k in keys] if captions else None,
    }


def at_grid(images: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalized (B, 3, gh*p, gw*p), resized as NativeResizeFlip resizes."""
    size = [grid[0] * patch, grid[1] * patch]
    return normalize_images(TF.resize(images, size, interpolation=InterpolationMode.BICUBIC, antialias=True))


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def heldout_losses(model, images, captions, tokenizer, alpha: float) -> tuple[float, float]:
    """The pre-training objective on the held-out images (prefix lengths from a fixed generator)."""
    patch = model.patch_size
    num_patches = (images.shape[-2] // patch) * (images.shape[-1] // patch)
    prefix = sample_prefix_lengths(images.shape[0], num_patches, generator=torch.Generator().manual_seed(0))
    tokens, mask = tokenizer(captions)
    pixels, logits = model(images, tokens, prefix, mask)
    losses = aimv2_loss(pixels, logits, images, tokens, mask, prefix, patch, alpha=alpha)
    return float(losses.image), float(losses.text)


@torch.no_grad()
def pooled(encoder, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([encoder.forward_features(chunk).mean(1) for chunk in images.split(512)])


def linear_probe(train_x, train_y, val_x, val_y, steps: int = 300, lr: float = 0.05) -> float:
    """Top-1 (%) of a logistic regression (full-batch AdamW) on standardized frozen features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    head = nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    torch.manual_seed(0)
    head.reset_parameters()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * float((head(val_x).argmax(1) == val_y).float().mean())


def check_packed(model, images: torch.Tensor, tokenizer) -> float:
    """Largest |packed - alone| over the features of images at mixed grids: the learned variant's packed
    path (what it trains) against its per-image path (what is evaluated)."""
    grids = [(4, 4), (5, 4), (3, 6), (6, 3), (2, 5), (4, 5)]
    p = model.patch_size
    items = [(TF.resize(img, [g[0] * p, g[1] * p], antialias=True), "a digit") for img, g in zip(images, grids)]
    batch = PackedCollator(tokenizer, p, 48)(items, place_rows([g[0] * g[1] for g in grids], 48))
    layout = batch["layout"]
    bias = as_bias(packed_encoder_mask(layout["patch_image"], layout["patch_pos"], None))
    with torch.no_grad():
        packed = encode_packed_any(model.encoder, normalize_patch_pixels(batch["patches"]), layout["coords"], bias)
        packed = packed.flatten(0, 1)
        err = 0.0
        for i, (img, _) in enumerate(items):
            alone = model.encoder.forward_features(normalize_images(img[None]))[0]
            start = int(layout["image_start"][i])
            err = max(err, float((packed[start : start + alone.shape[0]] - alone).abs().max()))
    return err


def training_grids(cfg, draws: int = 5000) -> dict[tuple[int, int], float]:
    """Share of each patch grid among the crops of the training stream (Packing.plan on 112 px images)."""
    n = cfg.data.native
    packing = Packing(
        14,
        n.min_patches,
        n.max_patches,
        n.row_tokens,
        n.rows,
        n.window,
        tuple(cfg.data.crop_scale),
        tuple(cfg.data.crop_ratio),
    )
    torch.manual_seed(0)
    counts = collections.Counter(packing.plan({"json": '{"width": 112, "height": 112}'}).grid for _ in range(draws))
    return {g: c / draws for g, c in counts.items()}


# -- report (from the .json, so that `--report-only` re-renders it without training) ---------------
METRICS = (
    ("image", "image loss", 3),
    ("text", "text loss", 3),
    ("probe", "probe", 1),
    ("probe_init", "probe at init", 1),
)
PLACEHOLDER = "(to be written from the numbers above)"


def ms(values, digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def report(data: dict, conclusion: str = PLACEHOLDER) -> str:
    shares = ", ".join(f"{g} {v:.0%}" for g, v in sorted(data["training_grid_share"].items(), key=lambda kv: -kv[1]))
    res, seeds = data["results"], data["seeds"]
    grids = list(res["sincos"]["grids"])
    cols = [f"{name}, {v}" for _, name, _ in METRICS for v in ("sin-cos", "learned")]
    table, paired = [], []
    for g in grids:
        s, learned = res["sincos"]["grids"][g], res["learned"]["grids"][g]
        table.append(
            [g, f"{100 * data['training_grid_share'].get(g, 0):.1f}%"]
            + [ms(c[k], d) for k, _, d in METRICS for c in (s, learned)]
        )
        diffs = [(np.subtract(s[k], learned[k]), d) for k, _, d in METRICS]
        gains = [ms(np.subtract(c["probe"], c["probe_init"]), 1) for c in (s, learned)]
        paired.append([g] + [f"{x.mean():+.{d}f} ({', '.join(f'{v:+.{d}f}' for v in x)})" for x, d in diffs] + gains)
    table = markdown_table(["grid", "share of training crops", *cols], table)
    paired = markdown_table(
        ["grid", *(name for _, name, _ in METRICS), "probe gain over init: sin-cos", "probe gain over init: learned"],
        paired,
    )
    train = "; ".join(
        f"{v}: image {ms(res[v]['train_image'], 3)}, text {ms(res[v]['train_text'], 3)}" for v in VARIANTS
    )
    th, tw = res["table_grid"]
    return "\n".join(
        [
            "# Native resolution: fixed 2-D sin-cos positions vs a learned table resampled per grid",
            "",
            f"Command (shared 2-core CPU, fp32, {data['minutes']:.1f} min in all):",
            "",
            f"    {data['command']}",
            "",
            "## Setup",
            "",
            (
                f"`{data['config']}` (debug size: width 64, 2 encoder + 2 decoder blocks, patch 14; packed rows of "
                f"4 x 96 tokens), {data['steps']} steps, seeds {', '.join(map(str, seeds))} "
                "(trainer.seed = data.seed), "
                "on the demo set. Both variants train through `aimv2.pretraining.pretrain.pretrain(cfg)` (same "
                "stream and data order, packing, prefix draws, optimizer, schedule, clipping; every weight but the "
                "table starts equal); only the position term differs: **sin-cos** is the shipped `SinCosPatchEmbed` / "
                f"`encode_packed`, untouched; **learned** is a {th}x{tw}xD table "
                "(the config's nominal grid, 56 px / 14; "
                "normal(0.02), no weight decay, as the fixed-size model's) resampled to each image's own grid with "
                "timm's bicubic antialiased `resample_abs_pos_embed_nhwc` (script-local `ResampledPatchEmbed`; the "
                "packed path gathers each token's value from its image's resampled table). Its packed features equal "
                f"its per-image features to {data['packed_vs_alone_max_abs']:.1e} (max abs), so what is evaluated "
                "per image is what was trained packed."
            ),
            "",
            (
                "Evaluation: the 359 held-out digits (probe/val, never pre-trained on; 112 px squares) resized to "
                "each grid (bicubic, antialiased, as the training stream resizes). Image loss: the objective's "
                "normalized-pixel MSE; text loss: nats per caption token, with the captions `aimv2 shards demo` drew "
                "for these images (it writes them for the pretrain split only; the script replays its draw and "
                "checks it against the pretrain shards); prefix lengths from a fixed generator, the same for every "
                "model. Probe: top-1 (%) of a logistic regression (300 full-batch AdamW steps, lr 0.05) on "
                "standardized mean-pooled final features, fit on probe/train (1438 images) at the same grid; for "
                "the trained encoders and for their random inits. Share of training crops: how often the training "
                "stream gave that grid (`Packing.plan` on the demo's 112 px images): the training grids are "
                f"narrow ({shares}), so 3x6, 6x3, 6x6 and 8x8 are grids never seen and no row or column past the "
                "fifth occurs in training."
            ),
            "",
            "## Results",
            "",
            "Mean ± sample std over seeds:",
            "",
            table,
            "",
            (
                "Paired by seed (same data, same init but the table): sin-cos minus learned, mean (per seed). "
                "Negative loss / positive probe differences favour sin-cos:"
            ),
            "",
            paired,
            "",
            f"Final training losses (mean of the last 50 steps): {train}.",
            "",
            "## Conclusion",
            "",
            conclusion,
            "",
        ]
    )


def main(argv=None) -> None:
    global TABLE_GRID
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grids", type=lambda s: tuple(map(int, s.split("x"))), nargs="+", default=list(GRIDS))
    parser.add_argument(
        "--table-grid",
        type=lambda s: tuple(map(int, s.split("x"))),
        default=None,
        help="the learned table's grid, e.g. 16x16 (default: the config's nominal grid)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "eval/results/native_positions")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render OUT.md from OUT.json, keeping the .md's conclusion; no training",
    )
    args = parser.parse_args(argv)
    md_path, json_path = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    if args.report_only:
        old = md_path.read_text() if md_path.exists() else ""
        conclusion = old.split("## Conclusion\n\n", 1)[1].strip() if "## Conclusion\n\n" in old else PLACEHOLDER
        md_path.write_text(report(json.loads(json_path.read_text()), conclusion))
        return
    TABLE_GRID = args.table_grid
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads}.venv/bin/python eval/native_positions.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.time()
    data_dir = ROOT / "runs/demo/data"
    val = load_split(data_dir / "probe/val", heldout_captions(data_dir))
    train_split = load_split(data_dir / "probe/train")
    results = {
        v: {
            "grids": {f"{g[0]}x{g[1]}": collections.defaultdict(list) for g in args.grids},
            "train_image": [],
            "train_text": [],
            "seconds": [],
        }
        for v in VARIANTS
    }
    packed_err = 0.0
    with tempfile.TemporaryDirectory(prefix="native_positions_") as workdir:
        for seed in args.seeds:
            for variant in VARIANTS:
                run = train(variant, seed, args.steps, Path(workdir))
                cfg, res = run["cfg"], results[variant]
                tokenizer = build_tokenizer(cfg.data.tokenizer)
                if variant == "learned":
                    packed_err = max(packed_err, check_packed(run["final"], val["images"][:6], tokenizer))
                    results["table_grid"] = list(run["final"].encoder.patch_embed.pos_embed.shape[1:3])
                for key in ("train_image", "train_text", "seconds"):
                    res[key].append(run[key])
                for grid in args.grids:
                    cell = res["grids"][f"{grid[0]}x{grid[1]}"]
                    patch = run["final"].patch_size
                    val_x, train_x = at_grid(val["images"], grid, patch), at_grid(train_split["images"], grid, patch)
                    image, text = heldout_losses(run["final"], val_x, val["captions"], tokenizer, cfg.objective.alpha)
                    cell["image"].append(image)
                    cell["text"].append(text)
                    for key, model in (("probe", run["final"]), ("probe_init", run["init"])):
                        cell[key].append(
                            linear_probe(
                                pooled(model.encoder, train_x),
                                train_split["labels"],
                                pooled(model.encoder, val_x),
                                val["labels"],
                            )
                        )
                    print(
                        f"seed {seed} {variant:8s} {grid[0]}x{grid[1]}: image {image:.3f} text {text:.3f} "
                        f"probe {cell['probe'][-1]:.1f} (init {cell['probe_init'][-1]:.1f})",
                        flush=True,
                    )
                print(
                    f"seed {seed} {variant}: trained in {run['seconds']:.0f} s; final train image "
                    f"{run['train_image']:.3f} text {run['train_text']:.3f}",
                    flush=True,
                )
    data = {
        "command": command,
        "config": str(CONFIG.relative_to(ROOT)),
        "steps": args.steps,
        "seeds": args.seeds,
        "minutes": (time.time() - start) / 60,
        "packed_vs_alone_max_abs": packed_err,
        "training_grid_share": {f"{g[0]}x{g[1]}": s for g, s in sorted(training_grids(cfg).items())},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(report(data))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
