"""`aimv2 compress export RUN --format hf`: the attachment as a transformers LLaVA directory.

`transformers.AutoModelForImageTextToText.from_pretrained(DIR)` (a `LlavaForConditionalGeneration`) and
`transformers.AutoProcessor.from_pretrained(DIR)` (a `LlavaProcessor`) load it without this package, and
compute what `AttachedVLM` computes: the same logits and the same greedy tokens (tests/test_compress_hf_export.py).

The mapping, piece by piece (toolkit -> transformers):

- Frozen encoder -> `model.vision_tower`, an `Aimv2VisionModel`: weights by
  `aimv2.checkpoints.convert.timm_to_hf`, config by `aimv2.checkpoints.export.hf_config` (what
  `aimv2 export --format hf` writes). The toolkit's patches are `forward_features`: the last block's
  output after the final RMSNorm, every token a patch (no class token). In LLaVA that is
  `vision_feature_layer=-1` with `vision_config.tie_last_hidden_states=true` (so `hidden_states[-1]`
  is the normed `last_hidden_state`, not the pre-norm one) and `vision_feature_select_strategy="full"`
  (nothing dropped).
- `MLPProjector.proj` = Linear(D_vis, D_llm), GELU (exact, erf), Linear(D_llm, D_llm), with biases ->
  `model.multi_modal_projector.linear_1`, `projector_hidden_act="gelu"`, `linear_2`,
  `multimodal_projector_bias=true`. LLaVA's hidden width is the LLM width: `compressor.hidden` must be
  0 or D_llm.
- The LM (`*ForCausalLM`) -> `model.language_model` (its base model, the same keys) and `lm_head`;
  `text_config` is the LM's config with the tokenizer's bos/eos/pad; `tie_word_embeddings` is kept.
- M = N visual tokens (mlp keeps every patch) -> `image_seq_length` = M; the processor writes
  (img_size / patch_size)^2 = M image tokens per image.
- The sequence `[bos][text.prefix][M visual tokens][text.prompt]`, then the greedy continuation ->
  the chat template: bos (added by the tokenizer, or written by the template when the tokenizer adds
  none), `text.prefix`, each message's items in order (an image -> `<image>`, a text as is), and
  `text.prompt` when `add_generation_prompt=True`. Roles are not rendered: the toolkit has none.
  The export checks that the processor's ids for one image are the attachment's sequence, through
  `apply_chat_template(..., tokenize=True)` and through `processor(text=..., images=...)`.
- Eval preprocessing (`Preprocessing`: bicubic resize of the short side, center crop, mean/std) ->
  `TimmWrapperImageProcessor`, timm's eval transform of the same settings: the same torchvision calls
  on the same PIL image, so equal pixel values (transformers needs timm for it).
- The tokenizer (`text.tokenizer`: a local Hugging Face tokenizer, or CLIP's BPE from open_clip) ->
  a copy of the Hugging Face one, or CLIP's BPE rebuilt with `tokenizers` (its vocabulary, merges,
  lower-casing and word pattern: the same ids); `<image>` added as a special token, its id in
  `image_token_index`. The `words` tokenizer has no transformers form and is refused.

`<image>` needs a row in the LM's embedding table: when the tokenizer fills the table, one zero row is
appended to the embedding and to `lm_head` (`text_config.vocab_size` + 1; the image positions are
replaced by visual tokens, so the row is never read there) and `generation_config.suppress_tokens`
keeps generation from choosing it, as the toolkit's argmax over the original vocabulary never does.
When the table has spare rows (Qwen2 pads it), `<image>` takes the first spare one and nothing changes.
Weights keep their dtypes (the encoder and projector fp32, the LM its own); `from_pretrained` loads
all of them as float32 unless given `dtype=` (e.g. torch.bfloat16 for a bf16 LM on a GPU).
Generation stops at the tokenizer's end-of-text token (`generation_config.eos_token_id`), the token
captions end with in training; `AttachedVLM.generate` always runs `max_new_tokens`.

Why not CLIPImageProcessor (what `aimv2 export --format hf` writes for an encoder): transformers' center
crop floors the half-pixel offset where torchvision rounds it (to even), so images whose resized long
side exceeds the crop by 4k + 3 pixels come out shifted by one pixel, and its default torchvision backend
resizes with antialiased tensor kernels (values off by up to 1/255 before normalization).

Only the `mlp` compressor maps onto a transformers class; the others are refused with one line saying
which class comes closest (`NO_HF_CLASS`): export them with `--format aimv2` (aimv2.compress.bundle).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from aimv2.checkpoints.convert import timm_to_hf
from aimv2.checkpoints.export import hf_config
from aimv2.checkpoints.preprocessing import Preprocessing
from aimv2.compress.vlm import AttachedVLM
from aimv2.data.tokenizer import CaptionTokenizer, ClipTokenizer, HFTokenizer
from aimv2.errors import UserError
from aimv2.fileio import atomic_directory

IMAGE_TOKEN = "<image>"
NO_HF_CLASS = {
    "pool": (
        "averages the patch grid before its MLP; the nearest transformers class, Gemma3ForConditionalGeneration, "
        "pools too but then applies an RMSNorm and one Linear (no GELU MLP)"
    ),
    "resampler": (
        "is a Perceiver Resampler with LayerNorm and GELU layers; the nearest transformers class, "
        "Idefics2ForConditionalGeneration, has a Perceiver resampler with RMSNorm, SwiGLU and grouped keys"
    ),
    "tokenpacker": "(region cross-attention of pooled queries) has no transformers class",
    "quecc": "(text-conditioned region queries) has no transformers class: LLaVA's projector never sees the text",
    "kdv": "(key-diversity pruning, then the MLP) has no transformers class: LLaVA keeps every patch",
}


def check_kind(kind: str) -> None:
    """A one-line UserError for a compressor kind with no transformers LLaVA form, naming the nearest class."""
    if kind != "mlp":
        why = NO_HF_CLASS.get(kind, "has no transformers class")
        raise UserError(
            f"--format hf: compressor '{kind}' {why}; export it with --format aimv2 "
            "(only mlp maps onto LlavaForConditionalGeneration)"
        )


def check_exportable(vlm: AttachedVLM) -> None:
    """A one-line UserError when the attachment has no transformers LLaVA form."""
    spec = vlm.compressor.spec
    check_kind(spec.kind)
    if spec.hidden and spec.hidden != spec.d_llm:
        raise UserError(
            f"--format hf: compressor.hidden={spec.hidden}, but LLaVA's projector's hidden width is the "
            f"LLM width {spec.d_llm}; export it with --format aimv2"
        )
    if vlm.lm is None:
        raise UserError("--format hf: the attachment has no LM")


# -- tokenizer ------------------------------------------------------------------------------------
def clip_tokenizer(tokenizer: ClipTokenizer):
    """open_clip's CLIP BPE as a transformers fast tokenizer with the same ids: its vocabulary and merges,
    lower-casing, CLIP's word pattern, byte-level BPE with `</w>` word ends; bos (`<start_of_text>`) first."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    bpe = tokenizer._bpe
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    tok = Tokenizer(
        BPE(
            vocab=dict(bpe.encoder),
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("</w>", "\u0120"), decoders.ByteLevel(), decoders.Strip(" ", 0, 1)]
    )
    bos, eos = bpe.decoder[tokenizer.bos_id], bpe.decoder[tokenizer.eot_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)


def transformers_tokenizer(tokenizer: CaptionTokenizer):
    """A copy of the attachment's tokenizer as a transformers tokenizer (CLIP's BPE rebuilt)."""
    if isinstance(tokenizer, HFTokenizer):
        return copy.deepcopy(tokenizer._tok)
    if isinstance(tokenizer, ClipTokenizer):
        return clip_tokenizer(tokenizer)
    raise UserError(
        f"--format hf: text.tokenizer ({type(tokenizer).__name__}) has no transformers form; "
        "attach with text.tokenizer.kind=hf (the LM's own) or clip"
    )


def _added_around(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when it adds special tokens."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return full, []


def _literal(text: str) -> str:
    """A Jinja expression printing `text` exactly."""
    return "{{- " + json.dumps(text, ensure_ascii=False) + " -}}"


def chat_template(prefix: str, prompt: str, bos_in_template: bool) -> str:
    """The toolkit's layout: [bos][text.prefix], each message's items in order (an image -> the image
    token, which the processor repeats M times; text as is), then [text.prompt] for the generation
    prompt. Roles are not rendered: the toolkit's sequence has none."""
    return "".join(
        [
            "{{- bos_token -}}" if bos_in_template else "",
            _literal(prefix) if prefix else "",
            "{%- for message in messages -%}",
            "{%- if message['content'] is string -%}{{- message['content'] -}}",
            "{%- else -%}{%- for item in message['content'] -%}",
            "{%- if item['type'] == 'image' -%}" + _literal(IMAGE_TOKEN),
            "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}",
            "{%- endfor -%}{%- endif -%}{%- endfor -%}",
            "{%- if add_generation_prompt -%}" + _literal(prompt) + "{%- endif -%}" if prompt else "",
        ]
    )


def _bos_in_template(tok, want: list[int]) -> bool:
    """Whether the template writes bos itself: no when the tokenizer adds exactly the toolkit's bos
    (Llama's, CLIP's rebuilt one) or nothing and none is wanted (Qwen2's); yes when it adds nothing
    but the toolkit puts bos first. Anything else (an appended eos, another leading token) is refused."""
    head, tail = _added_around(tok)
    if not tail and head == want:
        return False
    if not tail and not head and want == [tok.bos_token_id]:
        return True
    raise UserError(
        f"--format hf: the tokenizer adds {head} before and {tail} after a text, but the attachment "
        f"starts with {want} and appends nothing: no chat template reproduces its layout"
    )


# -- processor ------------------------------------------------------------------------------------
def image_processor(pre: Preprocessing):
    """timm's eval transform of these settings (Resize(short side, bicubic), CenterCrop, ToTensor,
    Normalize: the toolkit's `eval_transform`), as the image processor transformers loads for timm."""
    from transformers import TimmWrapperImageProcessor

    cfg = {
        "input_size": [3, pre.img_size, pre.img_size],
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": pre.interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    processor = TimmWrapperImageProcessor(pretrained_cfg=cfg)
    processor.pretrained_cfg = cfg  # saved with it: from_pretrained rebuilds the transform from it
    return processor


def build_processor(vlm: AttachedVLM, tokenizer: CaptionTokenizer, prefix: str, prompt: str):
    """(LlavaProcessor, image token id): the tokenizer with `<image>`, the chat template, the preprocessing."""
    from tokenizers import AddedToken
    from transformers import LlavaProcessor

    tok = transformers_tokenizer(tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    in_template = _bos_in_template(tok, bos)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    patch = vlm.encoder.patch_embed.patch_size[0]
    processor = LlavaProcessor(
        image_processor=image_processor(vlm.preprocessing),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=chat_template(prefix, prompt, in_template),
    )
    return processor, image_id


def check_layout(processor, vlm: AttachedVLM, image_id: int) -> None:
    """The processor's ids for one image, through both ways users call it (apply_chat_template with
    tokenize=True, and the processor on the rendered text), must be the attachment's sequence."""
    from PIL import Image

    size = vlm.preprocessing.img_size
    image = Image.new("RGB", (size, size))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}]}]
    m = vlm.compressor.num_tokens
    want = vlm.prefix_ids.tolist() + [image_id] * m + vlm.prompt_ids.tolist()
    direct = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    rendered = processor(text=text, images=image)
    for how, got in (("apply_chat_template", direct), ("processor(text=...)", rendered)):
        ids = list(got["input_ids"][0])
        if ids != want:
            raise UserError(
                f"--format hf: {how} gives {ids}, but the attachment reads {want} "
                "(text.prefix, image tokens, text.prompt): the tokenizer splits this text differently "
                "around the image token"
            )


# -- model ----------------------------------------------------------------------------------------
def special_ids(tok, tokenizer: CaptionTokenizer) -> tuple[int | None, int, int]:
    """(bos, eos, pad) for the exported configs: the attachment's bos and end-of-text (the token captions end
    with in training, where generation stops), the exported tokenizer's pad (else end-of-text)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tokenizer.eot_id
    return tokenizer.bos_id, tokenizer.eot_id, pad


def llava_config(vlm: AttachedVLM, image_id: int, vocab_rows: int, ids: tuple[int | None, int, int]):
    from transformers import Aimv2VisionConfig, LlavaConfig

    vision = {
        k: v
        for k, v in hf_config(vlm.encoder, "encoder.source").items()
        if k not in ("architectures", "model_type", "torch_dtype")
    }
    text = copy.deepcopy(vlm.lm.config)
    text.vocab_size = vocab_rows
    text.bos_token_id, text.eos_token_id, text.pad_token_id = ids
    return LlavaConfig(
        vision_config=Aimv2VisionConfig(**vision, tie_last_hidden_states=True),
        text_config=text,
        image_token_index=image_id,
        image_seq_length=vlm.compressor.num_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(vlm.lm.config, "tie_word_embeddings", False)),
    )


def _grow(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """(V, D) -> (rows, D), the new rows zero."""
    if weight.shape[0] >= rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def llava_model(vlm: AttachedVLM, image_id: int, ids: tuple[int | None, int, int]):
    """A LlavaForConditionalGeneration holding the attachment's weights (built on the meta device, its
    tensors assigned from the attachment's: nothing is initialized or copied twice)."""
    from transformers import LlavaForConditionalGeneration

    lm = vlm.lm
    embed = lm.get_input_embeddings().weight
    rows = max(embed.shape[0], image_id + 1)
    config = llava_config(vlm, image_id, rows, ids)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(timm_to_hf(vlm.encoder.state_dict()), strict=True, assign=True)
    proj = vlm.compressor.proj  # Linear, GELU, Linear
    if not (isinstance(proj[1], torch.nn.GELU) and proj[1].approximate == "none"):
        raise UserError("--format hf: the mlp projector's activation is not exact GELU")
    model.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict(), strict=True, assign=True)
    model.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict(), strict=True, assign=True)
    base_model = lm.base_model
    base = base_model.state_dict()
    embed_module = lm.get_input_embeddings()
    embed_key = next(f"{name}.weight" for name, m in base_model.named_modules() if m is embed_module)
    base[embed_key] = _grow(embed.detach(), rows)
    model.model.language_model.load_state_dict(base, strict=True, assign=True)
    model.lm_head.load_state_dict(
        {"weight": _grow(lm.get_output_embeddings().weight.detach(), rows)}, strict=True, assign=True
    )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = generation_config(lm, ids, suppress=[image_id] if rows > embed.shape[0] else [])
    return model.eval()


def generation_config(lm, ids: tuple[int | None, int, int], suppress: list[int]):
    """The LM's generation settings with the tokenizer's bos/eos/pad, and the appended image row suppressed."""
    gen = copy.deepcopy(lm.generation_config)
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids
    if suppress:
        gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(suppress))
    return gen


def export_hf(
    vlm: AttachedVLM,
    tokenizer: CaptionTokenizer,
    prefix: str,
    prompt: str,
    out: str | Path,
    overwrite: bool = False,
    source: str = "",
) -> Path:
    """Write the attachment as a transformers LLaVA directory (model, processor, chat template) at `out`,
    under a temporary name renamed into place (an existing `out` only with overwrite=True)."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: already exists (pass --overwrite to replace it)")
    check_exportable(vlm)
    processor, image_id = build_processor(vlm, tokenizer, prefix, prompt)
    check_layout(processor, vlm, image_id)
    model = llava_model(vlm, image_id, special_ids(processor.tokenizer, tokenizer))
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {
            "format": "aimv2-compress-hf",
            "version": 1,
            "source": source,
            "compressor": vlm.compressor.spec.to_dict(),
            "text": {"prefix": prefix, "prompt": prompt},
        }
        (tmp / "aimv2_export.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out


def export_module_hf(module, out: str | Path, overwrite: bool = False, source: str = "") -> Path:
    """`export_hf` of a trained `CompressModule` (what `aimv2 compress export --format hf` runs)."""
    return export_hf(
        module.vlm,
        module.tokenizer,
        module.text_cfg.prefix,
        module.text_cfg.prompt,
        out,
        overwrite=overwrite,
        source=source,
    )


# -- the command ----------------------------------------------------------------------------------
EXPORT_FORMATS = ("aimv2", "hf")


def usage_lines(out: Path) -> list[str]:
    """How to run the export with transformers alone (printed by the command; docs/compressors.md)."""
    return [
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        f"model = AutoModelForImageTextToText.from_pretrained({str(out)!r})",
        f"processor = AutoProcessor.from_pretrained({str(out)!r})",
        'messages = [{"role": "user", "content": [{"type": "image", "path": "photo.jpg"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, "
        'return_dict=True, return_tensors="pt")',
        "ids = model.generate(**inputs, max_new_tokens=30, do_sample=False)",
        'print(processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]


def _trained_kind(checkpoint: str) -> str | None:
    """The compressor kind a compress checkpoint was trained with, read without building the attachment
    (None when the file does not say; load_module then names what is wrong)."""
    from aimv2.checkpoints import schema

    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_module reports an unreadable file
        return None
    hparams = schema.hyper_parameters(raw) if isinstance(raw, dict) else {}
    section = hparams.get("compressor") or hparams.get("config", {}).get("compressor") or {}
    return section.get("kind") if isinstance(section, dict) else None


def run_export(run: str, out: str, fmt: str, overwrite: bool) -> int:
    """`aimv2 compress export RUN --format hf --out DIR [--overwrite]`: checks first (format, --out, the
    compressor kind), then loads the run and writes the directory."""
    from aimv2.compress.evaluate import resolve_checkpoint
    from aimv2.compress.module import load_module

    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt!r}: unknown export format (one of {', '.join(EXPORT_FORMATS)})")
    target = Path(out)
    if target.exists() and not overwrite:
        raise UserError(f"--out {target}: already exists (pass --overwrite to replace it)")
    ckpt = resolve_checkpoint(run)
    kind = _trained_kind(ckpt)
    if kind is not None:
        check_kind(kind)  # before the (possibly long) load
    written = export_module_hf(load_module(ckpt), target, overwrite=overwrite, source=ckpt)
    files = ", ".join(sorted(p.name for p in written.iterdir()))
    print(f"{ckpt} written as a transformers LLaVA directory to {written}/: {files}")
    print("run it with transformers alone:")
    for line in usage_lines(written):
        print(f"  {line}")
    return 0
