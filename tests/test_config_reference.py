"""docs/configuration.md cannot drift from the config schema: its key tables are generated from the dataclasses'
source (aimv2.config.load.config_reference: each key's type, default and comment) between the page's
`<!-- BEGIN GENERATED Name -->` / `<!-- END GENERATED Name -->` markers; the prose around them is kept as written.
Run this file as a script to rewrite the page: `.venv/bin/python tests/test_config_reference.py`.

The roots live here, not in aimv2.config: the config package sits below the jobs whose schemas it renders."""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "configuration.md"
# `model.safetensors`, `encoder.safetensors`: file names, not keys.
FILE_SUFFIXES = {"safetensors", "json", "yaml", "ckpt", "pt", "png", "md", "csv", "tsv", "txt", "tar", "py", "sh"}
REWRITE = "run `python tests/test_config_reference.py` to rewrite it"

# Marker name -> the modules that may hold the class, first found wins (modules merge while the package moves).
ROOTS = {
    "PretrainConfig": ("aimv2.config.schema", "aimv2.config"),
    "ProbeConfig": ("aimv2.probe.config", "aimv2.probe"),
    "CompressConfig": ("aimv2.compress.config", "aimv2.compress"),
    "SweepConfig": ("aimv2.compress.config", "aimv2.compress.config", "aimv2.compress.sweep", "aimv2.compress"),
}


def root_class(name: str) -> type:
    for module in ROOTS[name]:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ModuleNotFoundError:
            continue
        if found is not None:
            return found
    raise ImportError(f"{name} is in none of {', '.join(ROOTS[name])}: update ROOTS in tests/test_config_reference.py")


def _block(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- BEGIN GENERATED {name} \(tests/test_config_reference.py\) -->\n)(.*?)"
        rf"(<!-- END GENERATED {name} -->)",
        re.S,
    )


def rendered(text: str) -> str:
    """TEXT with every generated block rendered afresh from the schema."""
    from aimv2.config.load import config_reference

    for name in ROOTS:
        block = _block(name)
        assert block.search(text), f"docs/configuration.md lost the markers of {name}: {block.pattern}"
        table = config_reference(root_class(name))
        text = block.sub(lambda m, table=table: f"{m.group(1)}\n{table}\n{m.group(3)}", text)
    return text


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a user can type under CLS: `optim.lr`, and `data.sources[].urls` for a list's items."""
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if is_dataclass(hint):
            keys += dotted_keys(hint, f"{key}.")
            continue
        keys.append(key)
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and is_dataclass(args[0]):
            keys += dotted_keys(args[0], f"{key}[].")
    return keys


def test_configuration_page_is_generated_from_the_schema():
    text = PAGE.read_text(encoding="utf-8")
    assert text == rendered(text), f"docs/configuration.md is stale against the config dataclasses: {REWRITE}"


def test_every_key_is_in_the_page():
    text = PAGE.read_text(encoding="utf-8")
    for name in ROOTS:
        section = _block(name).search(text).group(2)
        missing = [k for k in dotted_keys(root_class(name)) if f"| `{k}` |" not in section]
        assert not missing, f"{name}: keys missing from docs/configuration.md ({REWRITE}): {missing}"
    for key in (
        "optim.lr",
        "data.sources",
        "data.sources[].urls",
        "data.tokenizer.path",
        "trainer.resume",
        "head.kinds",
        "compressor.kind",
        "lms[].name",
    ):
        assert f"| `{key}` |" in text, key


def _all_keys() -> set[str]:
    """Every dotted key of every root, list items written both as `x[].y` and `x.N.y` (as errors name them)."""
    return {k for name in ROOTS for k in dotted_keys(root_class(name))}


def _documented_keys() -> list[tuple[str, str]]:
    """(file, key) for every code span of README.md and docs/*.md that is a config key or `key=value`, a key
    being dotted and starting with a section of some schema (`optim.lr`, `data.val.urls=...`, `trainer.*`)."""
    sections = {k.split(".")[0].removesuffix("[]") for k in _all_keys() if "." in k}
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for span in re.findall(r"`([^`\n]+)`", text):
            match = re.fullmatch(r"([a-z_]+(?:\.(?:[a-z_0-9]+(?:\[\])?|\*))+)(?:[=:].*)?", span.strip())
            key = match.group(1) if match else ""
            if key.split(".")[0] in sections and key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                found.append((str(path.relative_to(REPO)), key))
    return found


def test_every_key_the_docs_name_exists():
    """A key renamed or removed in the schema cannot stay in the prose (`trainer.*` names a section)."""
    keys = _all_keys()
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k} | {k.split(".")[0] for k in keys}
    wrong = []
    for source, key in _documented_keys():
        plain = re.sub(r"\.\d+(?=\.|$)", "[]", key)  # data.sources.0.urls -> data.sources[].urls
        if not (plain in keys or plain in sections or plain.removesuffix(".*") in sections):
            wrong.append(f"{source}: `{key}`")
    assert not wrong, "config keys the documentation names that no schema has:\n" + "\n".join(wrong)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    before = PAGE.read_text(encoding="utf-8")
    after = rendered(before)
    PAGE.write_text(after, encoding="utf-8")
    print(f"{PAGE.relative_to(REPO)}: {'rewritten' if after != before else 'already up to date'}")
