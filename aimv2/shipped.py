"""The configs the commands need (the demo's, the strategy presets, the probe's), wherever aimv2 runs.

`configs/` sits at the top of the repository, where the design card puts it and where the documented
commands point (`aimv2 pretrain configs/pretrain/debug.yaml`). The build ships the same directory inside
the package as `aimv2/configs` (pyproject.toml maps the package `aimv2.configs` onto `configs/`), so a
regular install can run `aimv2 demo` or `--strategy ddp` from any directory.

The copy used is always the one that belongs to the code that runs: inside the package (a wheel
install), else beside the package directory in its source checkout (an editable install, or
PYTHONPATH pointing at a checkout). Asking `importlib.resources` for the package `aimv2.configs`
instead would fail in an editable install (setuptools' editable finder does not resolve a mapped
directory without an `__init__.py`) and would let an editable install of another checkout answer for a
PYTHONPATH'd one.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The directory of shipped configs: `aimv2/configs` of a wheel install, or the checkout's `configs/`."""
    package = files("aimv2")
    if not isinstance(package, Path):  # a zip import: the commands pass file paths to OmegaConf
        raise RuntimeError(f"aimv2 is imported from {package}, not from files on disk; install it with pip")
    candidates = [package / "configs"]
    if (package.parent / "pyproject.toml").is_file():  # a source checkout, not site-packages' neighbours
        candidates.append(package.parent / "configs")
    for candidate in candidates:
        if (candidate / "pretrain" / "debug.yaml").is_file():
            return candidate
    raise RuntimeError(
        f"aimv2's shipped configs are missing (looked in {', '.join(map(str, candidates))}): "
        "a broken install; reinstall aimv2"
    )


def shipped_config(relative: str) -> Path:
    """A shipped config by its path under configs/, e.g. `pretrain/debug.yaml`."""
    path = configs_dir() / relative
    if not path.is_file():
        raise RuntimeError(f"no shipped config {relative} in {configs_dir()}")
    return path


def strategy_presets() -> dict[str, Path]:
    """The scale-out presets of configs/strategy/ by name (ddp, fsdp, deepspeed_zero2, ...)."""
    return {path.stem: path for path in sorted((configs_dir() / "strategy").glob("*.yaml"))}


def user_config(path: str | Path) -> Path:
    """A config path given on the command line. A documented path such as `configs/pretrain/debug.yaml`
    that does not exist here (aimv2 was installed, and this is not a checkout) means the shipped copy;
    the substitution is said on stderr, so a run never silently reads another file than the one named."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parts[:1] != ("configs",):
        return given
    shipped = configs_dir().joinpath(*given.parts[1:])
    if not shipped.is_file():
        return given
    print(f"{given}: not found here; using the copy shipped with aimv2: {shipped}", file=sys.stderr)
    return shipped
