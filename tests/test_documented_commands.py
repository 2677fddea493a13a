"""Every command the documentation gives runs as written (tests/doc_commands.py finds them), so the
documentation cannot drift from the code.

Each documentation file's commands run in order in a fixture directory of their own, which holds a
copy of the repository's configs/, launch/, eval/ and data/ and what the documentation presumes a user
has: the demo's shards and checkpoint (what `aimv2 demo` leaves), a checkpoint where the recipes'
runs leave theirs, a folder of captioned photos, an ImageNet-style class tree, a local LLM directory
with its tokenizer. Absolute paths such as /data/... and /models/... point into the fixture. A
command is shrunk only by appending: CPU runs get `trainer.max_steps=2`-style overrides, commands
for a GPU cluster (accelerator gpu, several nodes, FSDP or DeepSpeed, and the sbatch and torchrun
launches, which run `aimv2 pretrain` with the same arguments) run as `--rehearse`. The few commands
that cannot run here say why, and name what covers them.

The documentation is README.md, every page of docs/ (a page added there is read without being named
here) and the eval/, data/ and benchmarks/ READMEs. The fast tests at the end check that every COVERED
entry still names a documented command, that the pages' relative links and anchors resolve, and that
every `aimv2/....py` file and `aimv2.x.y` module they (and the config headers and scripts) name exists.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shlex
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.cli import main
from aimv2.config import load_config
from aimv2.engine.rehearsal import restored_process_state
from doc_commands import (
    DOCS,
    MARKDOWN,
    REPO,
    DocCommand,
    anchors,
    code_references,
    documented_commands,
    markdown_links,
)
from fault_helpers import run_or_show_stacks

ROOTS = ("data", "photos", "models", "datasets")  # absolute documentation paths, found in FIXTURE/abs/
COVERED = {  # command prefix -> why it does not run here, and what runs it instead
    "git config core.hooksPath": "it configures the developer's own clone; tests/test_lint.py runs the hook itself",
    "python3 -m venv": "the README's two setup commands need a fresh clone and the package registry: .ci/run runs the "
    "second in a clean checkout, and the demo (`aimv2 demo`) runs below, from tiny.yaml's header",
    ".venv/bin/python benchmarks/run.py": "the full benchmark run takes 10 minutes; tests/test_benchmarks.py runs each "
    "of its scripts at toy size",
    "git clone https://github.com/apple/ml-l3m": "it fetches Apple's trainer from GitHub, which CI cannot reach; "
    "eval/parity_l3m.py (below) is what uses it",
    "python eval/parity_l3m.py": "it runs Apple's ml-l3m, which the user fetches (with hydra-core and fvcore); CI has "
    "neither: tests/test_checkpoints_interop.py tests the name map it compares through, "
    "and eval/results/parity_l3m*.md hold its figures",
    ".venv/bin/python -m pytest": "the test suite this test is part of (README.md, docs/development.md): .ci/run "
    "runs the whole suite on a clean checkout",
    'python -c "from transformers import AutoTokenizer': "it downloads SigLIP's tokenizer from the Hugging Face hub, "
    "which CI cannot reach; a saved tokenizer directory is "
    "loaded by tests/test_tokenizer.py",
}
CPU_RUN = [
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.checkpoint_every_n_steps=1",
    "data.num_workers=0",
    "data.batch_size=4",
    "data.shuffle_buffer=0",
]
REHEARSE = ["--rehearse", "--rehearse-devices", "1"]
# Appended to particular commands (matched by a fragment of their text), beyond the shrinking above.
EXTRA = {
    # the quickstart's pattern stands for what `aimv2 shards captions` printed; the fixture's photos fill one shard
    "run_dir=runs/mine": ["data.sources=[{urls: 'FIXTURE/abs/data/mine/00000.tar'}]"],
    "aimv2 demo": [
        "trainer.max_steps=2",
        "visualize.every_n_steps=0",
        "--probe",
        "optim.epochs=1",
        "--probe",
        "optim.warmup_epochs=0",
    ],
    "compress train configs/compress/tiny.yaml": CPU_RUN[:3] + ["data.batch_size=4"],
    "compress evaluate": ["--max-batches", "1", "--batch-size", "4"],
    "compress plan": ["--repeats", "1"],
    "aimv2 probe": [
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "data.num_workers=0",
        "accelerator=cpu",
        "--devices",
        "1",
    ],
    "imagenet_attentive": ["data.batch_size=2"],  # the fixture's ImageNet has 6 images per split
    # the report card's scene tasks, small: 60 train and 30 val scenes per task (the recorded run used the defaults)
    "shards scenes --out runs/demo/scenes": ["--counts", "40", "60", "30"],
    # the documented pattern stands for the user's shards: one of the demo's
    "ablation configs/pretrain/debug.yaml": ["data.sources=[{urls: 'FIXTURE/runs/demo/data/pretrain/00000.tar'}]"],
    # one trained variant and the random init (tests/test_ablation.py runs all of them); --variants
    # last, since its list would take the overrides after it
    "aimv2 ablation": [
        "trainer.max_steps=2",
        "--seeds",
        "0",
        "--scenes",
        "40",
        "20",
        "20",
        "--probe",
        "optim.epochs=1",
        "--probe",
        "optim.warmup_epochs=0",
        "--variants",
        "aimv2",
        "random",
    ],
    # 2 LMs x 2 M of 1 step each (the real grid, 3 x 3 of 150 steps, is recorded in eval/results/scaling_vlm_tiny)
    "compress sweep configs/sweep/tiny.yaml": [
        "tokens=[1,4]",
        "overrides=[trainer.max_steps=1,trainer.progress_bar=false,data.batch_size=4,data.num_workers=0]",
        "lms=[{name: h16, overrides: [lm.hidden_size=16, lm.intermediate_size=32, lm.num_heads=2]}, "
        "{name: h32, overrides: [lm.hidden_size=32, lm.intermediate_size=64]}]",
        "eval.max_batches=1",
        "eval.batch_size=4",
        "eval.num_workers=0",
        "fit.bootstrap=5",
    ],
    # 2 sizes x 3 lengths of a few steps on a few hundred scenes (the real ladder: eval/results/scaling_encoder_ladder)
    "encoder_ladder.sh": [
        "--scenes",
        "300 40",
        "--steps",
        "2 3 4",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.shuffle_buffer=0",
        "data.val.batch_size=8",
    ],
    # one per-M kind and one trained over all M; every kind trains in tests/test_compress_*.py
    "compress_sweep.sh": [
        "--tokens",
        "1",
        "--kinds",
        "pool quecc",
        "trainer.max_steps=1",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=32-true",
        "trainer.strategy=auto",
        "lm.dtype=float32",
        "data.train=FIXTURE/runs/demo/data/pretrain/00000.tar",
        "data.val=FIXTURE/runs/demo/data/pretrain/00005.tar",
        "data.batch_size=4",
        "data.num_workers=0",
    ],
}


# -- the fixture -------------------------------------------------------------------------------------
def _jpeg(path: Path, seed: int, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def _pretrain_checkpoint(path: Path, img_size: int) -> None:
    """A freshly initialized debug pre-training checkpoint with CLIP's vocabulary (what a run leaves)."""
    import lightning

    from aimv2.pretraining.module import AIMv2PretrainModule

    torch.manual_seed(0)
    module = AIMv2PretrainModule({"size": "debug", "img_size": img_size}, {}, {}, vocab_size=49408, max_text_len=77)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "global_step": 0,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )


def _local_llm(path: Path) -> None:
    """A tiny random Qwen2 and a word-level tokenizer without BOS, saved as a local LLM directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    words = [
        "<pad>",
        "</s>",
        "<unk>",
        "a",
        "handwritten",
        "digit",
        *"zero one two three four five six seven eight nine".split(),
    ]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    config = Qwen2Config(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from aimv2.data.demo import build_demo_shards

    root = tmp_path_factory.mktemp("docs_base")
    build_demo_shards(root / "runs/demo/data")
    _pretrain_checkpoint(root / "runs/demo/pretrain/checkpoints/last.ckpt", 56)
    _pretrain_checkpoint(root / "runs/demo/pretrain/checkpoints/step=0000000.ckpt", 56)  # the demo's random init
    _pretrain_checkpoint(root / "runs/aimv2_large_224/checkpoints/last.ckpt", 224)
    photos = root / "abs/photos"
    lines = []
    for i in range(6):
        _jpeg(photos / f"img{i}.jpg", i)
        lines.append(json.dumps({"image": f"img{i}.jpg", "caption": f"a photo number {i}"}))
    (photos / "captions.jsonl").write_text("\n".join(lines) + "\n")
    for top, name in (("data", "imagenet"), ("datasets", "imagenet"), ("data", "birds"), ("data", "cars")):
        for split in ("train", "val"):  # class folders, as ImageNet's and the ablation's example tasks
            for c, wnid in enumerate(("n01440764", "n01443537")):
                for i in range(3):
                    _jpeg(root / f"abs/{top}/{name}/{split}/{wnid}/{split}_{c}_{i}.JPEG", 100 * c + i)
    shards = root / "runs/demo/data/pretrain"
    (root / "abs/data/cc").mkdir(parents=True)
    for i in range(10):  # the debug config's example pattern /data/cc/{00000..00009}.tar
        shutil.copy(shards / f"{i % 6:05d}.tar", root / f"abs/data/cc/{i:05d}.tar")
    _local_llm(root / "abs/models/Qwen2.5-0.5B")
    return root


def _workspace(base: Path, tmp_path: Path) -> Path:
    """A copy of the fixture plus copies (not links: commands write into data/, as the README's do) of
    the repository's directories the commands name."""
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    for name in ("configs", "launch", "eval", "data", "benchmarks"):
        shutil.copytree(REPO / name, ws / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return ws


# -- running one command -----------------------------------------------------------------------------
def _localize(text: str, ws: Path) -> str:
    """Absolute documentation paths (/data/..., /models/...) -> the fixture's; FIXTURE -> the workspace."""
    text = re.sub(r"(?<![\w.$/])/(" + "|".join(ROOTS) + r")(?=[/'\" ]|$)", lambda m: f"{ws}/abs/{m.group(1)}", text)
    return text.replace("FIXTURE", str(ws))


def _extra(text: str) -> list[str]:
    return [arg for fragment, args in EXTRA.items() if fragment in text for arg in args]


def _needs_cluster(argv: list[str], ws: Path) -> bool:
    """An `aimv2 pretrain` / `compress train` command whose config asks for GPUs, nodes, FSDP or DeepSpeed."""
    from aimv2.commands.pretrain import strategy_preset
    from aimv2.compress.config import CompressConfig

    compress = argv[:2] == ["compress", "train"]
    rest = argv[2:] if compress else argv[1:]
    config, strategy, overrides, i = rest[0], None, [], 1
    while i < len(rest):
        if rest[i] == "--strategy":
            strategy, i = rest[i + 1], i + 2
            continue
        if "=" in rest[i] and not rest[i].startswith("-"):
            overrides.append(rest[i])
        i += 1
    files = [ws / config] + ([strategy_preset(strategy)] if strategy else [])
    t = load_config(files, overrides, **({"schema": CompressConfig} if compress else {})).trainer
    return str(t.accelerator) in ("gpu", "cuda") or t.num_nodes > 1 or t.strategy in ("fsdp", "deepspeed")


def _launch_as_pretrain(text: str) -> list[str]:
    """`CONFIG=c STRATEGY=s sbatch [opts] launch/X.sbatch k=v ...` or `launch/torchrun.sh N c k=v`: the
    `aimv2 pretrain` arguments the template runs on every node (its srun / torchrun line)."""
    words = shlex.split(text)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    if words[0] == "launch/torchrun.sh":
        config, overrides = words[2], words[3:]
    else:
        template = next(i for i, w in enumerate(words) if w.startswith("launch/"))
        config, overrides = env["CONFIG"], words[template + 1 :]
    return ["pretrain", config, *(["--strategy", env["STRATEGY"]] if "STRATEGY" in env else []), *overrides]


REHEARSED: dict[str, str] = {}  # resolved config (run_dir aside) -> the rehearsal's output


def _rehearsal_key(argv: list[str], ws: Path) -> str:
    """The same config rehearses the same way whatever its run_dir: several commands share one run."""
    from omegaconf import OmegaConf

    from aimv2.cli import build_parser, parse_args
    from aimv2.commands.pretrain import strategy_preset
    from aimv2.compress.config import CompressConfig

    args = parse_args(build_parser(), argv)
    compress = argv[0] == "compress"
    files = [ws / args.config] + ([strategy_preset(args.strategy)] if getattr(args, "strategy", None) else [])
    cfg = load_config(files, args.overrides, **({"schema": CompressConfig} if compress else {}))
    values = OmegaConf.to_container(OmegaConf.structured(cfg))
    values.pop("run_dir")
    return json.dumps([argv[0], values], sort_keys=True, default=str)


def run_documented(command: DocCommand, ws: Path) -> str:
    """Run one command in workspace WS; returns its output; fails the test with the output otherwise."""
    text = _localize(command.text, ws)
    for prefix, why in COVERED.items():
        if command.text.startswith(prefix):
            return f"not run here: {why}"
    if "launch/compress_sweep_array.sbatch" in text:
        # each array task runs `aimv2 compress sweep $SWEEP --cell I` on a GPU; here: every cell's config
        # loads (--list); the cells themselves run in tests/test_compress_sweep.py
        sweep = dict(w.split("=", 1) for w in shlex.split(text) if re.match(r"^[A-Z_]+=", w))["SWEEP"]
        argv = ["compress", "sweep", sweep, "--list"]
    elif re.search(r"(^|\s)(sbatch|launch/torchrun\.sh)\s", text):
        argv = _launch_as_pretrain(text) + REHEARSE
    elif text.startswith("aimv2 "):
        argv = shlex.split(text)[1:]
        if argv[0] == "pretrain" or argv[:2] == ["compress", "train"]:
            argv += (
                REHEARSE
                if "--rehearse" in argv or _needs_cluster(argv, ws)
                else CPU_RUN + ["visualize.every_n_steps=0"][: argv[0] == "pretrain"]
            )
            argv = list(dict.fromkeys(argv)) if argv.count("--rehearse") > 1 else argv
        argv += _extra(command.text)
    else:  # a shell script of eval/ or data/, with aimv2 from this interpreter
        words = shlex.split(text) + [_localize(a, ws) for a in _extra(command.text)]
        env = os.environ | {"PYTHON": sys.executable, "AIMV2_PROGRESS": "off"}
        done = run_or_show_stacks(words, cwd=ws, env=env, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout
    argv = [_localize(a, ws) for a in argv]
    key = _rehearsal_key(argv, ws) if "--rehearse" in argv else None
    if key in REHEARSED:
        return REHEARSED[key]
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        with restored_process_state(), redirect_stdout(out), redirect_stderr(out):
            code = main(argv)
    finally:
        os.chdir(cwd)
    assert code == 0, f"{command}\nran as: aimv2 {shlex.join(argv)}\n{out.getvalue()[-4000:]}"
    if key is not None:
        REHEARSED[key] = out.getvalue()
    return out.getvalue()


SOURCES = sorted({c.source for c in documented_commands()}, key=lambda s: (s not in MARKDOWN, s))


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_every_documented_command_runs_as_written(source, base, tmp_path):
    ws = _workspace(base, tmp_path)
    for command in [c for c in documented_commands() if c.source == source]:
        output = run_documented(command, ws)
        if "--rehearse" in command.text or "rehearsal of" in output:
            assert "rehearsal passed" in output, f"{command}\n{output[-3000:]}"


def test_every_docs_page_is_read():
    pages = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
    assert pages and list(DOCS) == pages and set(pages) <= set(MARKDOWN)


def test_every_covered_command_is_still_documented():
    """A COVERED entry whose command left the documentation would hide nothing; drop it with the command."""
    texts = [c.text for c in documented_commands()]
    stale = [prefix for prefix in COVERED if not any(text.startswith(prefix) for text in texts)]
    assert not stale, f"COVERED names commands no page gives any more: {stale}"


def test_links_between_pages_resolve():
    """Relative links and pictures of README.md and docs/ point at files that exist, and at headings that exist."""
    broken = []
    for page in ("README.md", *DOCS, "eval/README.md", "data/README.md", "benchmarks/README.md"):
        for line, target in markdown_links(page):
            path, _, anchor = target.partition("#")
            resolved = (REPO / page).parent / path if path else REPO / page
            if not resolved.exists():
                broken.append(f"{page}:{line}: {target} (no such file)")
            elif (
                anchor and resolved.suffix == ".md" and anchor not in anchors(str(resolved.resolve().relative_to(REPO)))
            ):
                broken.append(f"{page}:{line}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _resolves(name: str) -> bool:
    """An `aimv2/....py` path is a file; a dotted name is a module, or a module's attribute chain."""
    if "/" in name:
        return (REPO / name).is_file()
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        stem = REPO.joinpath(*parts[:end])
        if stem.with_suffix(".py").is_file() or (stem / "__init__.py").is_file():
            obj = importlib.import_module(".".join(parts[:end]))
            for attr in parts[end:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


def test_named_code_paths_and_modules_exist():
    """Every `aimv2/....py` file and `aimv2.x.y` module (or attribute) the pages, the config headers and the
    eval/, data/ and benchmarks/ scripts name exists, so a renamed or merged module cannot leave them behind."""
    stale = [f"{page}:{line}: {name}" for page, line, name in code_references() if not _resolves(name)]
    assert not stale, "names of files or modules that do not exist:\n" + "\n".join(stale)
