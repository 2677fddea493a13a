"""Configuration: the pre-training schema (typed dataclasses whose sections validate themselves) and
the loader every job shares (YAML files with `base:` chains, `key=value` overrides)."""

from aimv2.config.load import as_section, load_config, merge_config, save_config, validate_config
from aimv2.config.schema import (
    STRATEGIES,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PretrainConfig,
    SourceConfig,
    TokenizerConfig,
    TrainerConfig,
    VisualizeConfig,
    check_lr_schedule,
)
from aimv2.errors import InvalidValue, check

__all__ = [
    "STRATEGIES",
    "DataConfig",
    "InvalidValue",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PretrainConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "VisualizeConfig",
    "as_section",
    "check",
    "check_lr_schedule",
    "load_config",
    "merge_config",
    "save_config",
    "validate_config",
]
