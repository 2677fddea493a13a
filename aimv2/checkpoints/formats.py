"""What a checkpoint is (format detection) and its raw contents (tensors in the source's own layout).

| format    | what it looks like |
|-----------|--------------------|
| lightning | `aimv2 pretrain` checkpoint: a pickle with `state_dict` (`model.encoder.*`) + `hyper_parameters` |
| zero      | DeepSpeed ZeRO directory (`latest`, `<tag>/*_model_states.pt`, `<tag>/*_optim_states.pt`) |
| dcp       | torch.distributed.checkpoint directory of fsdp2 (`.metadata`, `__<rank>_<n>.distcp`, `meta.pt`) |
| aimv2     | `aimv2 export --format aimv2`: `encoder.safetensors` (+ `decoder.safetensors`) + `config.json` |
| timm      | timm directory (`model.safetensors` + config.json with `architecture`) or a bare timm state dict |
| hf        | transformers `Aimv2VisionModel` directory (config.json + model.safetensors) or its bare state dict |
| apple     | Apple's ml-aim release keys (`preprocessor.*`, `trunk.*`), safetensors or .pth/.bin |

Detection looks at directory contents, config.json and tensor names, never at file extensions alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from aimv2.checkpoints import schema
from aimv2.checkpoints.convert import layout_of
from aimv2.checkpoints.dcp import is_dcp_checkpoint, load_meta, read_dcp_checkpoint
from aimv2.checkpoints.safe_io import load_pickle, load_safetensors, read_json, safetensors_keys
from aimv2.checkpoints.zero import is_zero_checkpoint, load_client_state, read_zero_checkpoint
from aimv2.errors import UserError

FORMATS = ("lightning", "zero", "dcp", "aimv2", "timm", "hf", "apple")
EXPORT_FORMAT = "aimv2-encoder"  # config.json "format" of this project's own export
_WEIGHT_FILES = ("encoder.safetensors", "model.safetensors", "pytorch_model.bin")
_LAYOUT_FORMAT = {"module": "lightning", "apple": "apple", "hf": "hf", "timm": "timm"}
_EXPECTED = (
    "expected this project's .ckpt, a DeepSpeed ZeRO or DCP (fsdp2) directory, an `aimv2 export` "
    "directory, a timm or transformers directory, or an Apple ml-aim state dict"
)


@dataclass
class RawCheckpoint:
    path: Path
    format: str  # one of FORMATS
    tensors: dict[str, torch.Tensor]  # in the source's own layout
    config: dict  # hyper_parameters (lightning, zero, dcp) or config.json; {} when the source has none
    preprocessor: dict | None = None  # transformers' preprocessor_config.json, when present
    decoder_file: Path | None = None  # an export's decoder.safetensors, read only when asked for
    step: int | None = None  # the training step of a Lightning, ZeRO or DCP checkpoint


def _resolve(path: str | Path) -> Path:
    """The checkpoint a path names: the weights file inside an export/timm/transformers directory means
    the directory (its config.json says what the weights are)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file() and path.name in _WEIGHT_FILES and (path.parent / "config.json").is_file():
        return path.parent
    return path


def _hf_weight_files(path: Path) -> list[Path]:
    """model.safetensors, the shards of model.safetensors.index.json, or pytorch_model.bin."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if not shards or missing:
            raise UserError(f"{index}: shard files missing: {', '.join(missing[:3]) or 'none listed'}")
        return [path / s for s in shards]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise UserError(f"{path}: config.json but no model.safetensors (or index / pytorch_model.bin) beside it")


def _keys(files: list[Path]) -> list[str]:
    return [
        k for f in files for k in (safetensors_keys(f) if f.suffix == ".safetensors" else _unwrap(load_pickle(f), f)[0])
    ]


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_safetensors(f) if f.suffix == ".safetensors" else _unwrap(load_pickle(f), f)[0])
    return out


def _detect_dir(path: Path) -> str:
    if is_zero_checkpoint(path):
        return "zero"
    if is_dcp_checkpoint(path):
        return "dcp"
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(
            f"{path}: directory of no known checkpoint layout (no config.json, no ZeRO 'latest', "
            f"no DCP .metadata); {_EXPECTED}"
        )
    cfg = read_json(cfg_path)
    if cfg.get("format") == EXPORT_FORMAT:
        return "aimv2"
    if "architecture" in cfg:
        return "timm"
    if str(cfg.get("model_type", "")).startswith("aimv2"):
        # Apple's first uploads kept ml-aim's keys under a transformers-style config.json.
        return "apple" if layout_of(_keys(_hf_weight_files(path))) == "apple" else "hf"
    raise UserError(f"{cfg_path}: config.json of an unknown kind (model_type {cfg.get('model_type')!r}); {_EXPECTED}")


def _format_of_keys(keys: list[str], path: Path) -> str:
    layout = layout_of(keys)
    if layout is None:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise UserError(
            f"{path}: no known encoder weights (found {sample}); expected keys like patch_embed.proj.weight "
            "(timm), preprocessor.patchifier.proj.weight (Apple), embeddings.patch_embed.weight "
            "(transformers) or model.encoder.* (aimv2 pretrain)"
        )
    return _LAYOUT_FORMAT[layout]


def _unwrap(obj, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, hyper-parameters) of a loaded pickle: a Lightning checkpoint, {'model'/'state_dict': ...}
    or a plain state dict."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint")
    schema.check_version(obj, path)
    hparams = schema.hyper_parameters(obj)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, hparams


def _step(obj) -> int | None:
    return schema.global_step(obj) if isinstance(obj, dict) else None


def detect_format(path: str | Path) -> str:
    """One of FORMATS, or a UserError naming the file. Directories and safetensors are recognised from
    their listing and headers; a pickle is loaded (weights_only) to look at its keys."""
    path = _resolve(path)
    if path.is_dir():
        return _detect_dir(path)
    if path.suffix == ".safetensors":
        return _format_of_keys(safetensors_keys(path), path)
    return _format_of_keys(list(_unwrap(load_pickle(path), path)[0]), path)


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Detect the format and read the tensors and whatever describes the architecture."""
    path = _resolve(path)
    if path.is_file():
        step = None
        if path.suffix == ".safetensors":
            tensors, config = load_safetensors(path), {}
        else:
            obj = load_pickle(path)
            tensors, config = _unwrap(obj, path)
            step = _step(obj)
        return RawCheckpoint(path, _format_of_keys(list(tensors), path), tensors, config, step=step)
    fmt = _detect_dir(path)
    if fmt == "zero":
        tensors, client = read_zero_checkpoint(path)
        schema.check_version(client, path)
        return RawCheckpoint(path, fmt, tensors, schema.hyper_parameters(client), step=_step(client))
    if fmt == "dcp":
        tensors, meta = read_dcp_checkpoint(path)
        # A pre-training module's state is "dcp"; a bare timm/transformers/Apple state dict saved with DCP
        # is read as that layout (or the one-line "no known encoder weights" error).
        fmt = fmt if layout_of(tensors) == "module" else _format_of_keys(list(tensors), path)
        schema.check_version(meta, path)
        return RawCheckpoint(path, fmt, tensors, schema.hyper_parameters(meta), step=_step(meta))
    config = read_json(path / "config.json")
    if fmt == "aimv2":
        decoder = path / "decoder.safetensors"
        return RawCheckpoint(
            path,
            fmt,
            load_safetensors(path / "encoder.safetensors"),
            config,
            decoder_file=decoder if decoder.is_file() else None,
        )
    files = _hf_weight_files(path)
    processor = path / "preprocessor_config.json"
    return RawCheckpoint(
        path, fmt, _read_tensors(files), config, preprocessor=read_json(processor) if processor.is_file() else None
    )


def client_state(path: str | Path, fmt: str | None = None) -> dict | None:
    """The training state of a checkpoint without its sharded weights: a Lightning file as loaded, a
    ZeRO directory's client state or a DCP directory's `meta.pt`; None for formats that hold none
    (exports, timm, transformers, Apple)."""
    path = _resolve(path)
    fmt = fmt or detect_format(path)
    if fmt == "zero":
        return load_client_state(path, mmap=True)
    if fmt == "dcp":
        return load_meta(path, mmap=True)
    if fmt == "lightning" and path.is_file():
        obj = load_pickle(path)
        return obj if isinstance(obj, dict) and "state_dict" in obj else None
    return None
