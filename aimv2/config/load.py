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

from aimv2.config.schema import PretrainConfig
from aimv2.errors import InvalidValue, UserError, one_line
from aimv2.fileio import markdown_table

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


def merge_config(
    path: str | Path | list | None, overrides: list[str] = (), schema: type = PretrainConfig
) -> DictConfig:
    """The merged, typed but not yet validated config (mandatory '???' values may remain)."""
    layers = [OmegaConf.structured(schema)]
    for item in [] if path is None else path if isinstance(path, (list, tuple)) else [path]:
        layers += read_layers(item)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        try:
            layers.append(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise UserError(one_line(err)) from None
        except Exception as err:  # YAML syntax of the value, e.g. an unquoted {00..09} inside [{...}]
            raise UserError(
                f"override {item!r}: value is not valid YAML ({str(err).splitlines()[0]}); "
                'quote shard patterns: urls: "/d/{00000..00009}.tar"'
            ) from None
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


# -- the config reference (docs/configuration.md) -------------------------------------------------------------------
def config_reference(cls: type, prefix: str = "", level: int = 3) -> str:
    """Markdown reference of a config dataclass and of every section under it, from their source: a table per
    section (key, type, default, meaning), the section's docstring above it. A key is `prefix` + the dotted path
    of the field; its meaning is the field's comment: the comment lines just above it (at its indentation), the
    trailing `# ...` of its line and that comment's continuation lines (comment-only lines indented past the
    field). The keys of the class itself come first, without a heading; each nested section follows under a
    heading of `level` #s, depth first; the items of a list of sections get their own table (`data.sources[].urls`).
    """
    import typing
    from dataclasses import MISSING

    hints = typing.get_type_hints(cls)
    notes = _field_comments(cls)
    rows, sections = [], []
    for f in fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        if is_dataclass(hint):
            sections.append((key, hint))
            continue
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        meaning = notes.get(f.name, "")
        if is_dataclass(item):
            sections.append((f"{key}[]", item))
            meaning = f"{meaning} Each item: `{key}[]` below.".strip()
        rows.append((key, _type_name(hint), _default_text(default), meaning))
    out = []
    if rows:
        out += [markdown_table(["key", "type", "default", "meaning"], [[f"`{key}`", *rest] for key, *rest in rows]), ""]
    for key, section in sections:
        out += [f"{'#' * level} `{key}`", ""]
        doc = _class_docstring(section)
        if doc:
            out += [doc, ""]
        out.append(config_reference(section, f"{key}.", level).rstrip("\n") + "\n")
    return "\n".join(out).rstrip("\n") + "\n"


def _class_source(cls: type):
    import ast
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(cls))
    return source, ast.parse(source).body[0]


def _class_docstring(cls: type) -> str:
    """The docstring as written, in one paragraph (a dataclass without one gets a generated `__doc__`)."""
    import ast

    doc = ast.get_docstring(_class_source(cls)[1]) or ""
    return " ".join(doc.split())


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment (the lines above it, then its trailing comment and that comment's continuation)."""
    import ast
    import io
    import tokenize

    source, node = _class_source(cls)
    lines = source.splitlines()
    comments = {}  # line number -> (column of the #, column of the text, text)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            comments[token.start[0]] = (token.start[1], token.start[1] + token.string.find(text), text)

    def alone(n: int) -> bool:  # a comment-only line
        return n in comments and not lines[n - 1][: comments[n][0]].strip()

    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, n = [], stmt.lineno - 1
        while alone(n) and comments[n][0] == stmt.col_offset:
            above.insert(0, comments[n][2])
            n -= 1
        trailing = [n for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments and not alone(n)]
        after = [comments[n][2] for n in trailing]
        n = stmt.end_lineno + 1
        # continued: a comment-only line indented past the field, or whose text lines up with the trailing comment's
        while (
            trailing and alone(n) and (comments[n][0] > stmt.col_offset or comments[n][1] >= comments[trailing[-1]][0])
        ):
            after.append(comments[n][2])
            n += 1
        out[stmt.target.id] = " ".join(text for text in above + after if text)
    return out


def _type_name(hint: Any) -> str:
    """`Optional[str]` and `str | None` alike read `str or null`; `list[float]`; `Any` reads `any`."""
    import types
    import typing

    if hint is type(None):
        return "null"
    if hint is Any:
        return "any"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in typing.get_args(hint))}]"
    return getattr(hint, "__name__", str(hint))


def _default_text(value: Any) -> str:
    """A default as a user would write it in YAML; a mandatory value (`???`) reads `required`."""
    if value == "???":
        return "required"
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != 0 and not 1e-2 <= abs(value) < 1e5:
            mantissa, exponent = f"{value:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        text = f"{value:.6g}"
        return text if any(c in text for c in ".en") else f"{text}.0"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)
