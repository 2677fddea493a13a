"""Models: the size ladder, the timm encoder with prefix attention, the multimodal decoder."""

from aimv2.models.aimv2 import AIMv2
from aimv2.models.sizes import SIZES, SizeSpec, get_size

__all__ = ["AIMv2", "SIZES", "SizeSpec", "get_size"]
