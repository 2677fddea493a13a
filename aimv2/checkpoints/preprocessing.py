"""The preprocessing an encoder expects, carried next to its weights through every format.

AIMv2's released encoders (and this project's) use CLIP's mean/std, a bicubic resize of the shorter
side and a center crop to the encoder's resolution (the pretrained_cfg of timm's `aimv2_*` models and the
preprocessor_config.json of Apple's `apple/aimv2-*` releases on the Hugging Face hub). Formats that record
preprocessing (timm's pretrained_cfg, transformers' preprocessor_config.json, our config.json) are
read back into this one dataclass so a user never has to guess the normalization.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# transformers stores PIL resample codes; 3 is PIL.Image.BICUBIC.
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing: resize (shorter side) + center crop to img_size, then normalize."""

    img_size: int
    mean: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
    std: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
    interpolation: str = "bicubic"

    def with_size(self, img_size: int) -> Preprocessing:
        return Preprocessing(img_size, self.mean, self.std, self.interpolation)

    def as_dict(self) -> dict:
        return {
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            int(d["img_size"]),
            tuple(d.get("mean", OPENAI_CLIP_MEAN)),
            tuple(d.get("std", OPENAI_CLIP_STD)),
            str(d.get("interpolation", "bicubic")),
        )

    @classmethod
    def from_timm_cfg(cls, cfg: dict, img_size: int) -> Preprocessing:
        """From a timm `pretrained_cfg` (input_size, mean, std, interpolation)."""
        return cls(
            img_size,
            tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
            tuple(cfg.get("std", OPENAI_CLIP_STD)),
            str(cfg.get("interpolation", "bicubic")),
        )

    @classmethod
    def from_hf_processor(cls, cfg: dict, img_size: int) -> Preprocessing:
        """From a transformers `preprocessor_config.json` (CLIPImageProcessor fields)."""
        names = {code: name for name, code in _PIL_RESAMPLE.items()}
        return cls(
            img_size,
            tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
            tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
            names.get(cfg.get("resample", 3), "bicubic"),
        )

    def timm_data_config(self) -> dict:
        """timm's data config (`timm.data.create_transform(**cfg)` builds the same eval transform)."""
        return {
            "input_size": (3, self.img_size, self.img_size),
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
            "crop_pct": 1.0,
            "crop_mode": "center",
        }

    def hf_processor_config(self) -> dict:
        """A CLIPImageProcessor config: `AutoImageProcessor.from_pretrained(dir)` rebuilds this preprocessing."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.img_size},
            "do_center_crop": True,
            "crop_size": {"height": self.img_size, "width": self.img_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
            "resample": _PIL_RESAMPLE.get(self.interpolation, 3),
        }
