"""Loading a config: schema defaults <- YAML file(s) <- `key=value` overrides, then every section's
`validate()`. Unknown keys, wrong types and missing files are `UserError`s that name the key or file.

A config file may start from another: a top-level `base: other.yaml` (relative to the file that
names it) is loaded first and the file's own values are merged over it, so a recipe that differs
from another in a few values says only those (configs/pretrain/aimv2_huge_224.yaml). Bases chain
(a base may have its own base); a loop is a one-line error. Lists are replaced, not merged.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aimv2.errors import InvalidValue
from aimv2.config.schema import PretrainConfig
from aimv2.errors import UserError, one_line

BASE_KEY = "base"




def read_layers(path: str | Path, chain: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The layers one config file stands for: its base chain first (oldest base first), then itself."""
    path = Path(path)
    if not path.is_file():
        named = f" (the base of {chain[-1]})" if chain else ""
        raise UserError(f"config file not found: {path}{named}")
    if path.resolve() in chain:
        loop = " -> ".join(p.name for p in (*chain, path.resolve()))
        raise UserError(f"{path}: its base chain loops ({loop})")
    try:
        layer = OmegaConf.load(path)
    except Exception as err:  # YAML syntax
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(layer, DictConfig) or BASE_KEY not in layer:
        return [layer]
    base = layer.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: '{BASE_KEY}' must name a config file, got {base!r}")
    return [*read_layers(path.parent / base, (*chain, path.resolve())), layer]


def merge_config(path: str | Path | list | None, overrides: list[str] = (),
                 schema: type = PretrainConfig) -> DictConfig:
    """The merged, typed but not yet validated config (mandatory '???' values may remain)."""
    layers = [OmegaConf.structured(schema)]
    for item in ([] if path is None else path if isinstance(path, (list, tuple)) else [path]):
        layers += read_layers(item)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise UserError(one_line(err)) from None
        except Exception as err:  # YAML syntax of the value, e.g. an unquoted {00..09} inside [{...}]
            raise UserError(f"override {item!r}: value is not valid YAML ({str(err).splitlines()[0]}); "
                            "quote shard patterns: urls: \"/d/{00000..00009}.tar\"") from None
    try:
        return OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        raise UserError(one_line(err)) from None


def load_config(path: str | Path | list | None, overrides: list[str] = (), schema: type = PretrainConfig):
    """Schema defaults <- YAML file(s), later ones win (e.g. a strategy preset) <- `key=value` overrides,
    validated section by section, as a dataclass instance."""
    merged = merge_config(path, overrides, schema)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(one_line(err)) from None
    validate_config(cfg)
    return cfg


def validate_config(cfg: Any, prefix: str = "") -> None:
    """Every section's `validate()`, inner sections (and list items) first, then the section itself;
    an error names the full dotted key (`data.sources.0.weight`)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            validate_config(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    validate_config(item, f"{prefix}{f.name}.{i}.")
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except InvalidValue as err:
        key = f"{prefix}{err.key}" if err.key else prefix.rstrip(".")
        raise UserError(f"config key '{key}': {err.msg}" if key else err.msg) from None


def as_section(cls: type, value: Any):
    """A config section from itself or from its plain dict (a checkpoint's hyper-parameters, a bundle's
    config): checkpoints store plain dicts so they load with weights_only=True, and keys added to the
    schema since a checkpoint was written take their defaults."""
    if isinstance(value, cls):
        return value
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), value or {}))
    except OmegaConfBaseException as err:
        raise UserError(one_line(err)) from None


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) so a run directory says how it was made."""
    from aimv2.fileio import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
