"""DeepSpeed ZeRO checkpoint directories, the one place that reads them: one fp32 state dict on the
CPU (no GPU needed) for checkpoint I/O, and the client state alone for resume (aimv2.engine.checkpointing).

Lightning's DeepSpeed strategy saves `last.ckpt/` as a directory: `latest` (holding the tag,
`checkpoint`), `checkpoint/*_model_states.pt` (Lightning's client state: hyper-parameters, ...)
and one `*_optim_states.pt` per rank holding that rank's flat fp32 partition. DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` stitches the partitions back together (stages 1-3).

It calls `torch.load(weights_only=False)`. To keep "loading never runs code from a file" true, it
runs under `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` with only DeepSpeed's own plain data classes allowed
(an enum, a loss-scaler record and a fragment address); any other global is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
from pathlib import Path

import torch

from aimv2.checkpoints.safe_io import describe_load_error
from aimv2.errors import UserError

# "module:Name" of the non-tensor objects DeepSpeed pickles into its checkpoint files (measured with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2/3 checkpoints of deepspeed 0.19).
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
)
# DeepSpeed's own entries in the model-states file; the rest is Lightning's client state.
_ENGINE_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
}


def is_zero_checkpoint(path: Path) -> bool:
    """A ZeRO checkpoint root (with `latest` or one tag sub-directory) or a tag directory itself."""
    if not path.is_dir():
        return False
    return (path / "latest").is_file() or any(path.glob("*/*model_states.pt")) or any(path.glob("*model_states.pt"))


def _root_and_tag(path: Path) -> tuple[Path, str]:
    if any(path.glob("*model_states.pt")):  # given the tag directory itself
        return path.parent, path.name
    latest = path / "latest"
    if latest.is_file():
        return path, latest.read_text().strip()
    tags = sorted({p.parent.name for p in path.glob("*/*model_states.pt")})
    if len(tags) != 1:
        raise UserError(
            f"{path}: ZeRO checkpoint without a 'latest' file and with {len(tags)} tag directories "
            f"({', '.join(tags)}); pass the tag directory itself"
        )
    return path, tags[0]


def safe_classes() -> list[type]:
    """DeepSpeed's plain-data classes that are installed here, for `torch.serialization.safe_globals`."""
    classes = []
    for entry in DEEPSPEED_SAFE_GLOBALS:
        module, name = entry.split(":")
        with contextlib.suppress(ImportError, AttributeError):
            classes.append(getattr(importlib.import_module(module), name))
    return classes


def model_states_files(path: str | Path) -> list[Path]:
    """The `*model_states.pt` files of a ZeRO checkpoint (root or tag directory); FileNotFoundError when none."""
    root, tag = _root_and_tag(Path(path))
    files = sorted((root / tag).glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states under {root / tag}")
    return files


def load_client_state(path: str | Path, mmap: bool = False) -> dict:
    """Rank 0's model-states file of a ZeRO checkpoint, loaded with weights_only=True (DeepSpeed's own
    plain classes allowed). `mmap=True` reads the pickle without the tensor bytes: enough to tell an
    intact checkpoint and its step (aimv2.engine.checkpointing) without reading gigabytes."""
    with torch.serialization.safe_globals(safe_classes()):
        return torch.load(model_states_files(path)[0], map_location="cpu", weights_only=True, mmap=mmap)


@contextlib.contextmanager
def _weights_only_loads():
    """Every torch.load inside runs with weights_only=True, whatever its caller passes."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        with torch.serialization.safe_globals(safe_classes()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_zero_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict of the whole module, Lightning's client state such as `hyper_parameters`)."""
    path = Path(path)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(
            f"{path} is a DeepSpeed ZeRO checkpoint; converting it needs deepspeed "
            "(pip install 'aimv2[deepspeed]'); it runs on the CPU"
        ) from None
    root, tag = _root_and_tag(path)
    with _weights_only_loads():
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints progress on stdout
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
            client = load_client_state(root / tag)
        except pickle.UnpicklingError as err:  # refused by weights_only, or a corrupt pickle
            raise describe_load_error(root / tag, err) from None
        except (FileNotFoundError, ValueError, KeyError, IndexError) as err:  # a missing rank file or entry
            raise UserError(
                f"{root / tag}: not a complete ZeRO checkpoint ({type(err).__name__}: {str(err).strip()[:200]})"
            ) from None
        except Exception as err:
            raise describe_load_error(root / tag, err) from None
    client = {k: v for k, v in client.items() if k not in _ENGINE_KEYS} if isinstance(client, dict) else {}
    state_dict = {
        k.removeprefix("_forward_module."): v.float() if v.is_floating_point() else v for k, v in state_dict.items()
    }
    return state_dict, client
