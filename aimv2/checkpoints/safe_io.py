"""Reading checkpoint files without running code from them.

A pickle can execute arbitrary code while it is unpickled, and checkpoints travel between people.
So every pickled file goes through `torch.load(weights_only=True)` (tensors, containers and
primitives only; anything else is refused, naming the global it asked for), weights we write are
safetensors, and every read failure becomes a one-line `UserError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aimv2.errors import UserError, one_line


def describe_load_error(path: Path, err: BaseException) -> UserError:
    """A one-line UserError for a failed torch.load: refused (unsafe global) or unreadable (truncated/corrupt)."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"[Uu]nsupported global: ([\w.]+)", text)
        what = f"the Python global `{found.group(1)}`" if found else "a non-tensor object"
        return UserError(
            f"{path}: refused to load: the pickle asks for {what}, which could run code "
            "(checkpoints are read with torch.load(weights_only=True); re-save it as plain tensors "
            "or safetensors)"
        )
    return UserError(f"{path}: not a readable checkpoint, truncated or corrupt ({one_line(err)})")


def load_pickle(path: Path) -> Any:
    """torch.load with weights_only=True on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise describe_load_error(path, err) from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except Exception as err:
        raise UserError(f"{path}: not a readable safetensors file, truncated or corrupt ({one_line(err)})") from None


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names from the header only (cheap: no tensor data is read)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as err:
        raise UserError(f"{path}: not a readable safetensors file, truncated or corrupt ({one_line(err)})") from None


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({one_line(err)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
