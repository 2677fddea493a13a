"""aimv2: pre-train vision encoders with the AIMv2 objective and deliver them to their users."""

__version__ = "0.1.0"


# Lazy (PEP 562), so `import aimv2` stays light for the CLI: `from aimv2 import load_encoder` imports
# torch and timm only when used.
_CHECKPOINT_API = ("load_encoder", "Preprocessing", "extract_features", "export_checkpoint")


def __getattr__(name: str):
    if name in _CHECKPOINT_API:
        from aimv2 import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module 'aimv2' has no attribute {name!r}")
