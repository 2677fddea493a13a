"""Attach a frozen encoder to an LLM through a token compressor (N patch tokens -> M LLM tokens).

Public API (imported lazily: the compressors need only torch; the attachment needs transformers):
    COMPRESSORS, CompressorSpec, build_compressor      the registry (aimv2/compress/components.py)
    AttachedVLM                                        encoder + compressor + LM (aimv2/compress/vlm.py)
    build_prefix, TextPrefix                           text-prefix KV caching (aimv2/compress/vlm.py)
    load_bundle, export_bundle                         exported bundles (aimv2/compress/bundle.py)
    CompressConfig                                     the config schema (aimv2/compress/config.py)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "COMPRESSORS": "components",
    "build_compressor": "components",
    "CompressorSpec": "base",
    "Compressor": "base",
    "AttachedVLM": "vlm",
    "build_prefix": "vlm",
    "TextPrefix": "vlm",
    "load_bundle": "bundle",
    "export_bundle": "bundle",
    "CompressConfig": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"aimv2.compress.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'aimv2.compress' has no attribute {name!r}")
