"""`aimv2 compress export RUN --format hf`: the attachment as a transformers LLaVA directory.

For a tiny random Llama (CLIP's BPE, bos first, `<image>` appended to a full embedding table) and a
tiny random Qwen2 read from a local directory (its own byte-level tokenizer without bos, a padded
embedding table, tied embeddings), each with an mlp projector on the debug encoder at 56 px, a fresh
Python process that never imports aimv2 loads the export with `AutoModelForImageTextToText` and
`AutoProcessor` and, on held-out image files, gives the toolkit's pixel values, its token layout, its
logits (within 1e-4, fp32) and its greedy tokens. Bad input is one line naming the culprit, with
nothing written."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.cli import main
from aimv2.compress.base import CompressorSpec
from aimv2.compress.config import CompressConfig
from aimv2.compress.module import load_module
from aimv2.compress.train import build_module
from aimv2.config import load_config
from aimv2.data.samples import eval_transform
from aimv2.errors import UserError
from compress_utils import TINY_LM, write_encoder_checkpoint

IMG = 56  # the debug encoder: 4 x 4 patches of 14 px, so M = 16
NEW_TOKENS = 8
# (width, height) of the held-out files: 59 x 56 center-crops at a 1.5 px offset, which torchvision rounds
# to 2 and transformers' CLIPImageProcessor floors to 1 (the reason the export uses timm's transform).
SIZES = [(59, 56), (80, 61), (56, 90)]
TEXT = ["text.prefix=you describe digits", "text.prompt='caption:'", "text.tokenizer.max_length=8"]

# Runs in a fresh interpreter: transformers only, never aimv2.
LOADER = r"""
import json, sys
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

spec = json.loads(open(sys.argv[1]).read())
results = {}
for name, path in spec["exports"].items():
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    batch = [[{"role": "user", "content": [{"type": "image", "path": image}]}] for image in spec["images"]]
    inputs = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=spec["new_tokens"], do_sample=False)
    results[name] = {"class": type(model).__name__, "input_ids": inputs["input_ids"],
                     "pixel_values": inputs["pixel_values"], "logits": logits,
                     "generated": generated[:, inputs["input_ids"].shape[1]:],
                     "image_token_id": model.config.image_token_id, "eos": model.generation_config.eos_token_id}
results["aimv2_imported"] = any(m == "aimv2" or m.startswith("aimv2.") for m in sys.modules)
torch.save(results, spec["out"])
"""


def byte_level_tokenizer(out):
    """A Qwen2-like tokenizer trained offline: byte-level BPE, no bos, `<|endoftext|>` as eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "a scanned image of a handwritten 7",
        "the digit three in blue ink",
        "you describe digits briefly",
        "caption: a blurry five",
    ] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.save_pretrained(out)
    return hf


def qwen2_directory(out):
    """A random tiny Qwen2 with its tokenizer, saved as a local model directory (8 spare embedding rows, tied
    embeddings, as Qwen2's small checkpoints have)."""
    from transformers import AutoModelForCausalLM

    from aimv2.compress.components import random_lm_config

    tok = byte_level_tokenizer(out)
    cfg = load_config(None, [*TINY_LM, "lm.arch=qwen2", "lm.init_std=0.2"], schema=CompressConfig)
    config = random_lm_config(cfg.lm, len(tok) + 8)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def compress_run(root, encoder, *overrides):
    """A checkpoint of `aimv2 compress train`'s layout (RUN/checkpoints/last.ckpt) of a freshly built attachment
    whose projector is drawn far from its init; the run directory."""
    cfg = load_config(None, [f"encoder.source={encoder}", *TINY_LM, *TEXT, *overrides], schema=CompressConfig)
    torch.manual_seed(0)
    module = build_module(cfg)
    with torch.no_grad():
        for p in module.vlm.compressor.parameters():
            p.normal_(std=0.3)
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "global_step": 0,
        "epoch": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    module.on_save_checkpoint(ckpt)  # what Lightning calls: the frozen parts leave, the schema is stamped
    (root / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, root / "checkpoints" / "last.ckpt")
    return root


def image_files(tmp):
    rng = np.random.default_rng(1)
    files = []
    for i, (w, h) in enumerate(SIZES):
        path = tmp / f"held_out_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both attachments exported through the CLI, the toolkit's own outputs, and the fresh process's."""
    tmp = tmp_path_factory.mktemp("hf_export")
    encoder = write_encoder_checkpoint(tmp / "encoder.ckpt", img_size=IMG)
    qwen = qwen2_directory(tmp / "qwen2")
    runs = {
        "llama": compress_run(
            tmp / "llama", encoder, "compressor.kind=mlp", "compressor.num_tokens=0", "lm.arch=llama", "lm.init_std=0.2"
        ),
        "qwen2": compress_run(
            tmp / "qwen2_run",
            encoder,
            "compressor.kind=mlp",
            "compressor.num_tokens=0",
            f"lm.path={qwen}",
            "text.tokenizer.kind=hf",
            f"text.tokenizer.path={qwen}",
        ),
    }
    images = image_files(tmp)
    toolkit, exports = {}, {}
    for name, run in runs.items():
        exports[name] = str(tmp / f"{name}_hf")
        assert main(["compress", "export", str(run), "--format", "hf", "--out", exports[name]]) == 0
        vlm = load_module(str(run / "checkpoints" / "last.ckpt")).vlm
        pre = vlm.preprocessing
        x = torch.stack([eval_transform(pre.img_size, pre.mean, pre.std)(Image.open(f).convert("RGB")) for f in images])
        with torch.no_grad():
            embeds, mask, _ = vlm.sequence(vlm.visual_tokens(x), len(images))
            logits = vlm.lm(inputs_embeds=embeds, attention_mask=mask).logits
            generated = vlm.generate(x, NEW_TOKENS)
        toolkit[name] = {"vlm": vlm, "pixels": x, "logits": logits, "generated": generated}
    spec = {"exports": exports, "images": images, "new_tokens": NEW_TOKENS, "out": str(tmp / "hf_outputs.pt")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(tmp / "loader.py"), str(tmp / "spec.json")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "tmp": tmp,
        "runs": runs,
        "exports": exports,
        "toolkit": toolkit,
        "hf": torch.load(spec["out"], weights_only=False),
    }


@pytest.mark.slow
def test_the_fresh_process_never_imported_aimv2(exported):
    assert exported["hf"]["aimv2_imported"] is False
    assert {exported["hf"][name]["class"] for name in ("llama", "qwen2")} == {"LlavaForConditionalGeneration"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_processor_gives_the_toolkit_pixels_and_token_layout(exported, name):
    hf, ours = exported["hf"][name], exported["toolkit"][name]
    assert torch.equal(hf["pixel_values"], ours["pixels"])  # bit-equal, the 1.5 px crop offset included
    vlm, image = ours["vlm"], hf["image_token_id"]
    m = vlm.compressor.num_tokens
    assert m == 16
    want = vlm.prefix_ids.tolist() + [image] * m + vlm.prompt_ids.tolist()
    assert hf["input_ids"].tolist() == [want] * len(SIZES)
    # Llama: CLIP's <start_of_text> first (the tokenizer adds it); Qwen2: no bos at all
    assert (vlm.prefix_ids[0].item() == 49406) == (name == "llama")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_logits_and_greedy_tokens_equal_the_toolkit(exported, name):
    hf, ours = exported["hf"][name], exported["toolkit"][name]
    vocab = ours["logits"].shape[-1]
    # llama: <image> got a row appended (49409 columns, never generated); qwen2: it took a spare row
    assert hf["logits"].shape[-1] == vocab + (1 if name == "llama" else 0)
    diff = (hf["logits"][..., :vocab] - ours["logits"]).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e} over {tuple(ours['logits'].shape)}")
    assert diff < 1e-4
    for got, want in zip(hf["generated"].tolist(), ours["generated"].tolist()):
        # transformers stops at end-of-text; the toolkit's loop always runs NEW_TOKENS
        assert got == want[: len(got)] and (len(got) == NEW_TOKENS or got[-1] == hf["eos"])
    print(f"{name}: greedy tokens equal: {hf['generated'].tolist()}")


@pytest.mark.slow
def test_clip_bpe_rebuilt_for_transformers_gives_open_clip_ids(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["exports"]["llama"])
    ours = exported["toolkit"]["llama"]["vlm"]
    from aimv2.data.tokenizer import ClipTokenizer

    clip = ClipTokenizer(16)
    for text in [
        "A scanned image of a handwritten 7.",
        "it's   the DIGIT three,in blue-ink!!",
        "café 2024 x3",
        "you describe digits",
        "caption:",
    ]:
        ids = clip.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok.decode(ids) == clip.decode(ids)
    assert tok("a")["input_ids"][0] == clip.bos_id and ours.prefix_ids[0].item() == clip.bos_id


@pytest.mark.slow
def test_existing_out_is_refused_then_replaced_with_overwrite(exported, capsys):
    out = exported["tmp"] / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run = str(exported["runs"]["llama"])
    assert main(["compress", "export", run, "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "already exists (pass --overwrite" in err and err.count("\n") == 0, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["compress", "export", run, "--format", "hf", "--out", str(out), "--overwrite"]) == 0
    assert "AutoModelForImageTextToText.from_pretrained" in capsys.readouterr().out
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
    } <= {p.name for p in out.iterdir()}
    assert not (out / "keep.txt").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".taken")] == []  # no temporaries


@pytest.mark.slow
def test_bad_input_is_one_line_naming_the_culprit(exported, capsys):
    tmp = exported["tmp"]
    pool = compress_run(tmp / "pool", tmp / "encoder.ckpt", "compressor.kind=pool", "compressor.num_tokens=4")
    run = str(exported["runs"]["llama"])
    cases = [
        ([str(tmp / "encoder.ckpt")], "not an `aimv2 compress train` checkpoint"),  # a pre-training checkpoint
        ([str(tmp / "nowhere")], "checkpoint not found"),
        ([run, "--format", "onnx"], "--format 'onnx': unknown export format (one of aimv2, hf)"),
        (
            [str(pool)],
            "compressor 'pool' averages the patch grid before its MLP; the nearest transformers class, "
            "Gemma3ForConditionalGeneration",
        ),
    ]
    for extra, message in cases:
        out = tmp / "never"
        argv = ["compress", "export", *extra, "--out", str(out)]
        if "--format" not in extra:
            argv += ["--format", "hf"]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
        assert not out.exists() and not [p for p in tmp.iterdir() if p.name.startswith(".never")]


@pytest.mark.slow
def test_an_interrupted_export_leaves_nothing(exported, monkeypatch):
    from transformers import LlavaProcessor

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", fail)
    out = exported["tmp"] / "interrupted"
    with pytest.raises(RuntimeError, match="disk full"):
        main(["compress", "export", str(exported["runs"]["llama"]), "--format", "hf", "--out", str(out)])
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".interrupted")]


def test_what_llava_cannot_hold_is_refused():
    from aimv2.compress.hf_export import NO_HF_CLASS, check_exportable, transformers_tokenizer
    from aimv2.data.tokenizer import WordTokenizer

    def attachment(kind, hidden=0):
        spec = CompressorSpec(
            kind=kind, d_vis=64, d_llm=32, grid=(4, 4), num_tokens=16 if kind == "mlp" else 4, hidden=hidden
        )
        return SimpleNamespace(compressor=SimpleNamespace(spec=spec), lm=object())

    check_exportable(attachment("mlp"))
    check_exportable(attachment("mlp", hidden=32))
    with pytest.raises(UserError, match=r"compressor.hidden=48, but LLaVA's projector's hidden width is the LLM width"):
        check_exportable(attachment("mlp", hidden=48))
    assert set(NO_HF_CLASS) == {"pool", "resampler", "tokenpacker", "quecc", "kdv"}
    for kind in NO_HF_CLASS:
        with pytest.raises(UserError, match=f"compressor '{kind}' .*--format aimv2") as err:
            check_exportable(attachment(kind))
        assert "\n" not in str(err.value)
    words = WordTokenizer.__new__(WordTokenizer)
    with pytest.raises(UserError, match="WordTokenizer.*has no transformers form"):
        transformers_tokenizer(words)
