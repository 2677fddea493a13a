"""Weight-layout conversion as pure dict-in dict-out functions, kept outside the models.

Layouts (as the public code defines them: timm's models/vision_transformer.py, Apple's ml-aim
release at github.com/apple/ml-aim, transformers' models/aimv2/modeling_aimv2.py):
- timm: the encoder's own `VisionTransformer.state_dict()` (`patch_embed.proj`, `blocks.N.attn.qkv`, ...).
  Every checkpoint this project writes holds the encoder in this layout (under `model.encoder.`).
- apple: ml-aim's release (`preprocessor.patchifier.*`, `trunk.blocks.N.*`, `trunk.post_trunk_norm`).
  timm's own `checkpoint_filter_fn` already converts it to timm's; `apple_to_timm` reuses it.
- hf: transformers' `Aimv2VisionModel` (`embeddings.*`, `encoder.layers.N.{attention,ffn}.*`, `rms_norm`),
  with q/k/v as three matrices where timm has one fused `qkv`.
- l3m: the whole pre-training model of Apple's trainer ml-l3m (github.com/apple/ml-l3m,
  configs/aimv2/001_aimv2_hfdata.yaml: `models.image_encoder.*`, `models.text_decoder.*`), encoder and
  decoder, q/k/v as three matrices; `l3m_to_module` maps it onto this project's `AIMv2` module
  (eval/parity_l3m.py compares the two trainers step for step through it).
Keys a mapping does not know pass through unchanged, so a strict load lists them as unexpected
instead of silently dropping weights.

A native-resolution encoder (aimv2.models.native) has the same keys minus `pos_embed`: its sin-cos
positions are computed, not stored, so the timm <-> hf mappings carry it unchanged (transformers
computes the same table when its config says `is_native`). `native_to_learned` writes the table
out for layouts that can only hold a learned one (timm's own).
"""

from __future__ import annotations

import re
from functools import cache

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from aimv2.models.native import grid_position_embedding

StateDict = dict[str, torch.Tensor]

# (timm prefix, other prefix); {i} is a block index.
_HF_PREFIXES = [
    ("patch_embed.proj.", "embeddings.patch_embed."),
    ("patch_embed.norm.", "embeddings.rms_norm."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.rms_norm1."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.rms_norm2."),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.attention.out_proj."),
    ("blocks.{i}.mlp.fc1_g.", "encoder.layers.{i}.ffn.gate_proj."),
    ("blocks.{i}.mlp.fc1_x.", "encoder.layers.{i}.ffn.up_proj."),
    ("blocks.{i}.mlp.fc2.", "encoder.layers.{i}.ffn.down_proj."),
    ("norm.", "rms_norm."),
]
# The inverse of timm's `_convert_aimv2` (used inside `checkpoint_filter_fn`).
_APPLE_PREFIXES = [
    ("pos_embed", "preprocessor.pos_embed"),
    ("patch_embed.proj.", "preprocessor.patchifier.proj."),
    ("patch_embed.norm.", "preprocessor.patchifier.norm."),
    ("blocks.{i}.norm1.", "trunk.blocks.{i}.norm_1."),
    ("blocks.{i}.norm2.", "trunk.blocks.{i}.norm_2."),
    ("blocks.{i}.attn.", "trunk.blocks.{i}.attn."),
    ("blocks.{i}.mlp.fc1_g.", "trunk.blocks.{i}.mlp.fc1."),
    ("blocks.{i}.mlp.fc1_x.", "trunk.blocks.{i}.mlp.fc3."),
    ("blocks.{i}.mlp.fc2.", "trunk.blocks.{i}.mlp.fc2."),
    ("norm.", "trunk.post_trunk_norm."),
]
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
# (this project's AIMv2 module prefix, ml-l3m prefix). Their SwiGLU is fc2(silu(fc1(x)) * fc3(x)), timm's
# fc2(silu(fc1_g(x)) * fc1_x(x)); their blocks, heads and text embedding sit under their MetaModel parts.
_L3M_ENCODER, _L3M_DECODER = "models.image_encoder.", "models.text_decoder."
_L3M_BLOCK = [
    ("norm1.", "norm_1."),
    ("norm2.", "norm_2."),
    ("attn.proj.", "attn.proj."),
    ("mlp.fc1_g.", "mlp.fc1."),
    ("mlp.fc1_x.", "mlp.fc3."),
    ("mlp.fc2.", "mlp.fc2."),
]
_L3M_PREFIXES = [
    ("encoder.pos_embed", _L3M_ENCODER + "preprocessor.blocks.0.pos_embed"),
    ("encoder.patch_embed.proj.", _L3M_ENCODER + "preprocessor.blocks.0.patchifier.proj."),
    ("encoder.patch_embed.norm.", _L3M_ENCODER + "preprocessor.blocks.0.patchifier.norm."),
    *[(f"encoder.blocks.{{i}}.{ours}", f"{_L3M_ENCODER}trunk.blocks.{{i}}.{theirs}") for ours, theirs in _L3M_BLOCK],
    ("encoder.norm.", _L3M_ENCODER + "trunk.post_trunk_norm."),
    ("decoder.image_proj.", _L3M_DECODER + "preprocessor.vision_preprocessor.module."),
    ("decoder.text_embed.", _L3M_DECODER + "preprocessor.text_preprocessor.text_embedding."),
    ("decoder.start_token", _L3M_DECODER + "preprocessor.text_preprocessor.cls_token"),
    *[(f"decoder.blocks.{{i}}.{ours}", f"{_L3M_DECODER}trunk.blocks.{{i}}.{theirs}") for ours, theirs in _L3M_BLOCK],
    ("decoder.norm.", _L3M_DECODER + "trunk.post_trunk_norm."),
    ("decoder.text_head.", _L3M_DECODER + "head.blocks.0.linear."),
    ("decoder.pixel_head.", _L3M_DECODER + "head.blocks.1.linear."),
]
_L3M_QKV = re.compile(r"^models\.(image_encoder|text_decoder)\.trunk\.blocks\.(\d+)\.attn\.([qkv])_proj\.weight$")
_L3M_TEXT_POS = _L3M_DECODER + "preprocessor.text_preprocessor.positional_embedding"


@cache
def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)"))


def _rename(key: str, pairs: list[tuple[str, str]], forward: bool) -> str:
    """Rewrite the first matching prefix (timm -> other when forward, else other -> timm)."""
    for timm_prefix, other_prefix in pairs:
        src, dst = (timm_prefix, other_prefix) if forward else (other_prefix, timm_prefix)
        match = _compile(src).match(key)
        if match:
            head = dst.replace("{i}", match.group(1)) if match.groups() else dst
            return head + key[match.end() :]
    return key


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """The entries under `prefix`, with it removed (e.g. `model.encoder.` of a pre-training checkpoint)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def layout_of(keys) -> str | None:
    """Which layout a set of tensor names is in: 'module' (this project's pre-training module),
    'apple', 'hf', 'timm', or None."""
    keys = list(keys)
    if any(k.startswith(("model.encoder.", "_forward_module.model.encoder.")) for k in keys):
        return "module"
    if any(k.startswith(("preprocessor.patchifier.", "trunk.blocks.")) for k in keys):
        return "apple"
    if any(k.startswith(("embeddings.patch_embed.", "vision_model.embeddings.patch_embed.")) for k in keys):
        return "hf"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    return None


def module_to_timm(state_dict: StateDict) -> StateDict:
    """The encoder of a pre-training module's state dict (Lightning's old `_forward_module.` wrapper and
    torch.compile's `_orig_mod.` removed)."""
    state_dict = {k.removeprefix("_forward_module.").replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    return strip_prefix(state_dict, "model.encoder.")


def timm_to_hf(state_dict: StateDict) -> StateDict:
    """timm encoder -> `Aimv2VisionModel` (fused qkv split into q/k/v; pos_embed (1, N, D) -> (N, D))."""
    out: StateDict = {}
    for key, value in state_dict.items():
        fused = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if fused:
            i, kind = fused.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):  # rows: [q; k; v], each (D, ...)
                out[f"encoder.layers.{i}.attention.{name}_proj.{kind}"] = part.clone()
        elif key == "pos_embed":
            out["embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])  # (N, D)
        else:
            out[_rename(key, _HF_PREFIXES, forward=True)] = value
    return out


def hf_to_timm(state_dict: StateDict) -> StateDict:
    """`Aimv2VisionModel` (or the vision tower `vision_model.*` of a full `Aimv2Model`) -> timm encoder.

    The text tower and projections of a full model are not part of the image encoder and are dropped."""
    if any(k.startswith("vision_model.") for k in state_dict):
        state_dict = strip_prefix(state_dict, "vision_model.")
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        split = _QKV.match(key)
        if split:
            i, name, kind = split.groups()
            qkv.setdefault((i, kind), {})[name] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)  # (1, N, D)
        else:
            out[_rename(key, _HF_PREFIXES, forward=False)] = value
    return out | _stack_qkv(
        qkv,
        lambda i, kind: f"blocks.{i}.attn.qkv.{kind}",
        lambda i, kind, n: f"encoder.layers.{i}.attention.{n}_proj.{kind}",
    )


def _stack_qkv(groups: dict[tuple[str, str], dict[str, torch.Tensor]], fused, separate) -> StateDict:
    """Each complete {q, k, v} group stacked row-wise into one fused tensor named fused(*group key); an
    incomplete group keeps its separate tensors (named separate(*group key, part)) so a strict load names them."""
    out: StateDict = {}
    for key, parts in groups.items():
        if set(parts) == {"q", "k", "v"}:
            out[fused(*key)] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:
            out.update({separate(*key, n): t for n, t in parts.items()})
    return out


def timm_to_apple(state_dict: StateDict) -> StateDict:
    """timm encoder -> ml-aim's release layout (the inverse of the mapping inside timm's filter)."""
    return {_rename(k, _APPLE_PREFIXES, forward=True): v for k, v in state_dict.items()}


def apple_names_to_timm(state_dict: StateDict) -> StateDict:
    """Apple names -> timm names, nothing else: enough to read an Apple state dict's shapes before a
    model exists. The conversion used for loading is timm's own (`apple_to_timm`)."""
    return {_rename(k, _APPLE_PREFIXES, forward=False): v for k, v in state_dict.items()}


def apple_to_timm(state_dict: StateDict, model: VisionTransformer) -> StateDict:
    """ml-aim's release layout -> timm, by timm's own `checkpoint_filter_fn` (it also resamples the
    position embedding if `model` has another grid)."""
    return checkpoint_filter_fn(dict(state_dict), model)


def native_to_learned(state_dict: StateDict, grid: tuple[int, int]) -> StateDict:
    """A native encoder's timm state dict plus the `pos_embed` (1, gh*gw, D) a learned-table encoder of
    that grid needs: its sin-cos table, exact on this grid only (another grid gets it resampled)."""
    if "pos_embed" in state_dict:
        raise ValueError("native_to_learned: the state dict already has a pos_embed (not a native encoder's)")
    width = state_dict["patch_embed.proj.weight"].shape[0]  # (D, 3, p, p)
    table = grid_position_embedding(int(grid[0]), int(grid[1]), int(width))  # (gh, gw, D), row-major
    return {**state_dict, "pos_embed": table.reshape(1, -1, width)}


def l3m_to_module(state_dict: StateDict, max_text_len: int) -> StateDict:
    """ml-l3m's AIMv2 model (its `InSeriesMetaModels` state dict) -> this project's `AIMv2` state dict.

    Their q, k, v (D, D) are stacked into timm's fused qkv (3D, D). Their caption position table has
    context_length + 1 rows: the start token takes row 0 and the last caption token the last row, whose
    output their loss drops (`LLMCrossEntropyLoss(shift_target=False)` predicts token j from position j
    and ignores the final one), so that row never touches a loss; ours has the `max_text_len` rows that
    do and is (1, L, D). Any other key passes through unchanged, so a strict load names it."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        split = _L3M_QKV.match(key)
        if split:
            part, i, name = split.groups()
            qkv.setdefault(("encoder" if part == "image_encoder" else "decoder", i), {})[name] = value
        elif key == _L3M_TEXT_POS:
            if value.shape[0] < max_text_len:
                raise ValueError(
                    f"l3m_to_module: {key} has {value.shape[0]} rows, fewer than max_text_len {max_text_len}"
                )
            out["decoder.text_pos_embed"] = value[:max_text_len].unsqueeze(0)  # (1, L, D)
        else:
            out[_rename(key, _L3M_PREFIXES, forward=False)] = value
    theirs = {"encoder": _L3M_ENCODER, "decoder": _L3M_DECODER}
    return out | _stack_qkv(
        qkv,
        lambda where, i: f"{where}.blocks.{i}.attn.qkv.weight",
        lambda where, i, n: f"{theirs[where]}trunk.blocks.{i}.attn.{n}_proj.weight",
    )
