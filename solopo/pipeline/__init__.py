"""Typed pipeline core: stage contract, config, executor, atomic IO."""

from .config import StageConfig, build_config, parse_length, parse_lengths
from .errors import ConfigError, DataError, MissingDependencyError, SolopoError
from .runner import Pipeline, load_manifest, load_output
from .stage import Stage, StageContext

__all__ = [
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "Pipeline",
    "SolopoError",
    "Stage",
    "StageConfig",
    "StageContext",
    "build_config",
    "load_manifest",
    "load_output",
    "parse_length",
    "parse_lengths",
]
