"""torch.distributed.checkpoint (DCP) directories, the one place that reads and writes them: what FSDP2
(`fully_shard`, the `fsdp2` strategy preset) saves, read back on the CPU without a process group, at
any world size, and converted to one file.

The layout is Lightning's `ModelParallelStrategy` one (lightning 2.6, fabric/strategies/model_parallel.py),
so a directory written by either reads the same:

    step=0000100.ckpt/
      .metadata        DCP's index of every tensor chunk: written last, by rank 0, after every rank's shards
      __0_0.distcp     rank 0's shards (`__<rank>_<n>.distcp`), one or more per rank
      __1_0.distcp
      meta.pt          Lightning's client state (hyper_parameters, global_step, loops, callbacks, ...)

The DCP keys are `state_dict` (the LightningModule's model state: `model.encoder.*`, `model.decoder.*`)
and `optimizer_<i>` (torch's `get_optimizer_state_dict`: keyed by parameter name, not by id).

Complete means `.metadata` and `meta.pt` are both there: DCP writes `.metadata` only after all ranks
finished their shards, and the strategy writes `meta.pt` after that, inside a hidden temporary
directory renamed into place at the end (aimv2.engine.trainer), so a half-written save is never
under a checkpoint's name. A directory with shards but no `.metadata` is refused with a one-line
error naming it.

Nothing read here runs code from the files: DCP's own reader unpickles `.metadata` with plain
`pickle.load`; here it goes through an unpickler that allows only DCP's metadata records, torch
dtypes and sizes (`_MetadataUnpickler`); tensor bytes are read raw, other objects with
`torch.load(weights_only=True)` (DCP's own choice), and `meta.pt` with `weights_only=True`.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from aimv2.checkpoints.safe_io import describe_load_error
from aimv2.errors import UserError

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint.filesystem's `.metadata`
META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
MODEL_KEY = "state_dict"  # Lightning's key for the module's state inside the DCP checkpoint
OPTIMIZER_PREFIX = "optimizer_"

# Globals a DCP `.metadata` pickle may name (measured with pickletools on torch 2.14 checkpoints):
# the record classes of torch.distributed.checkpoint.metadata, the filesystem writer's storage info,
# torch.Size, dtypes, the layout helper and the path of `storage_meta.checkpoint_id`.
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the globals a DCP index holds; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Weights only load failed: Unsupported global: GLOBAL {module}.{name}")


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A DCP directory: its index `.metadata` or any `*.distcp` shard (an incomplete one included, so
    that reading it says what is missing instead of "unknown layout")."""
    path = Path(path)
    return path.is_dir() and ((path / DCP_METADATA).is_file() or any(path.glob("*.distcp")))


def check_complete(path: Path, need_meta: bool = False) -> None:
    """A one-line UserError naming the directory unless DCP finished writing it (and, with `need_meta`,
    Lightning's `meta.pt` is there too: a training checkpoint to resume from)."""
    if not (path / DCP_METADATA).is_file():
        shards = len(list(path.glob("*.distcp")))
        raise UserError(
            f"{path}: incomplete DCP checkpoint: no {DCP_METADATA} beside its {shards} .distcp shard "
            "file(s) (DCP writes it last, after every rank's shards: the save was interrupted)"
        )
    if need_meta and not (path / META_FILE).is_file():
        raise UserError(
            f"{path}: DCP checkpoint without Lightning's {META_FILE} (global step, hyper-parameters): "
            "not a training checkpoint, or its save was interrupted"
        )


def _reader(path: Path):
    """DCP's FileSystemReader with the safe `.metadata` unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(path / DCP_METADATA, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def read_metadata(path: str | Path):
    """DCP's index of a complete directory (`Metadata`: every key, shape, dtype and chunk), without
    reading any shard; a one-line UserError when it is missing, refused or unreadable."""
    path = Path(path)
    check_complete(path)
    try:
        return _reader(path).read_metadata()
    except Exception as err:
        raise describe_load_error(path / DCP_METADATA, err) from None


def top_level_keys(path: str | Path) -> list[str]:
    """The top-level keys of a DCP checkpoint (`state_dict`, `optimizer_0`, ...), from its index."""
    metadata = read_metadata(path)
    return sorted(
        {str(fqn_path[0]) for fqn_path in (metadata.planner_data or {}).values() if fqn_path}
        or {key.split(".")[0] for key in metadata.state_dict_metadata}
    )


def read_dcp_state(path: str | Path, keys: set[str] | None = None) -> dict[str, Any]:
    """The nested state dict of a DCP directory (only the top-level `keys`, all when None), every
    sharded tensor put back together, on the CPU in this process: no process group, any world size
    it was written at. A truncated shard or a missing rank file is a one-line UserError."""
    # What torch's own dcp_to_torch_save does (format_utils): `dcp.load` would fill only the keys
    # the given dict already has, and the planner that rebuilds them from the index is private.
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    read_metadata(path)  # completeness and the safe unpickling, with their own messages
    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state, storage_reader=_reader(path), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True
        )
    except (Exception, CheckpointException) as err:  # DCP wraps a failure in CheckpointException (a BaseException)
        text = " ".join(str(err).split())
        raise UserError(
            f"{path}: DCP checkpoint unreadable, a shard file is missing or truncated "
            f"({type(err).__name__}: {text[:240]})"
        ) from None
    return state


def load_meta(path: str | Path, mmap: bool = False) -> dict:
    """Lightning's `meta.pt` (client state: hyper_parameters, global_step, loops, ...) with
    weights_only=True; {} when the directory has none (a DCP checkpoint written outside Lightning)."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return {}
    try:
        obj = torch.load(meta, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise describe_load_error(meta, err) from None
    if not isinstance(obj, dict):
        raise UserError(f"{meta}: holds a {type(obj).__name__}, not Lightning's checkpoint metadata")
    return obj


def model_tensors(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The flat model state dict inside a DCP state: Lightning's `state_dict` entry, torchtitan's
    `model`, or the top level itself (a module's state saved directly)."""
    for key in (MODEL_KEY, "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(
            f"{path}: DCP checkpoint without model tensors (top-level keys: {', '.join(sorted(state)[:5]) or 'none'})"
        )
    return tensors


def read_dcp_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the model's full state dict, Lightning's client state such as `hyper_parameters`): what
    aimv2.checkpoints.formats reads for `load_encoder`, the probe and export. Optimizer states are
    not read."""
    path = Path(path)
    keys = set(top_level_keys(path))
    wanted = {MODEL_KEY} if MODEL_KEY in keys else ({"model"} if "model" in keys else None)
    tensors = model_tensors(read_dcp_state(path, wanted), path)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, load_meta(path)


def optimizer_by_index(state: dict) -> dict:
    """torch's `get_optimizer_state_dict` form (states keyed by parameter name, groups listing names)
    -> `Optimizer.state_dict()`'s form (keyed by position in the groups), which a plain optimizer and
    Lightning's single-file strategies load. The order is the groups' own, as torch numbers them."""
    groups = state.get("param_groups", [])
    index = {name: i for i, name in enumerate(n for g in groups for n in g.get("params", []))}
    return {
        "state": {index[name]: value for name, value in state.get("state", {}).items() if name in index},
        "param_groups": [{**g, "params": [index[n] for n in g.get("params", [])]} for g in groups],
    }


def convert_dcp_to_file(path: str | Path, out: str | Path, *, optimizer: bool = True, overwrite: bool = False) -> dict:
    """Write a DCP checkpoint directory as one Lightning checkpoint file (`torch.save`, atomically):
    Lightning's metadata, the full fp32-as-saved `state_dict`, and (with `optimizer`) the optimizer
    states in torch's index-keyed form under `optimizer_states`. The file is what `aimv2 pretrain`
    writes under ddp/auto: `load_encoder`, the probe and export read it, and it resumes a run under a
    single-file strategy. Returns the checkpoint dict written."""
    from aimv2.fileio import atomic_file

    path, out = Path(path), Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
        raise UserError(f"{out}: the output must lie outside the DCP directory {path}")
    check_complete(path)
    keys = set(top_level_keys(path))
    wanted = {MODEL_KEY} | ({k for k in keys if k.startswith(OPTIMIZER_PREFIX)} if optimizer else set())
    state = read_dcp_state(path, wanted & keys if MODEL_KEY in keys else None)
    checkpoint = dict(load_meta(path))
    checkpoint[MODEL_KEY] = model_tensors(state, path)
    optim_keys = sorted(
        (k for k in state if k.startswith(OPTIMIZER_PREFIX)), key=lambda k: int(k[len(OPTIMIZER_PREFIX) :])
    )
    if optimizer and optim_keys:
        checkpoint["optimizer_states"] = [optimizer_by_index(state[k]) for k in optim_keys]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, sync_dir=True) as tmp:
        torch.save(checkpoint, tmp)
    return checkpoint


def save_dcp_checkpoint(state: dict[str, Any], meta: dict, path: str | Path, rank: int, barrier) -> None:
    """Collective (every rank calls it): write `state` (DTensors or plain tensors; each rank its own
    shards) as a DCP checkpoint in Lightning's layout at `path`, complete or not at all. The shards
    and the index go into a hidden `.NAME.tmp` directory beside `path`; rank 0 adds `meta.pt` and
    renames it over `path` (aimv2.fileio.publish_directory) once every rank is done. `barrier()`
    is the process group's barrier (a no-op in a single process)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    from aimv2.fileio import atomic_file, publish_directory

    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    # sync_files: every shard and the index are fsynced by their writer before `.metadata` appears.
    with warnings.catch_warnings():  # one process without a process group (tools, tests): meant so
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        save(state, storage_writer=FileSystemWriter(str(tmp), sync_files=True))
    barrier()
    if rank == 0:
        with atomic_file(tmp / META_FILE) as meta_tmp:
            torch.save(meta, meta_tmp)
        publish_directory(tmp, final, fsync=False)  # the writers fsynced their own files
    barrier()
