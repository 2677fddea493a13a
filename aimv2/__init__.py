"""aimv2: pre-train vision encoders with the AIMv2 objective and deliver them to their users."""

__version__ = "0.1.0"
