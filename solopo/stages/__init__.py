"""The pipeline's stages, in order. Importing this package registers each stage and its config section."""

from __future__ import annotations

from solopo.pipeline.config import register_section
from solopo.pipeline.stage import STAGES, Stage, register_stage

ORDER = ("load", "synth", "sample", "select", "export", "train", "eval")


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage known to the pipeline and its config section to the config."""
    register_stage(cls)
    register_section(cls.name, cls.Config)
    return cls


def chain(until: str, start: str = "load") -> list[type[Stage]]:
    """Stage classes from `start` to `until`, inclusive, in pipeline order."""
    names = ORDER[ORDER.index(start) : ORDER.index(until) + 1]
    return [STAGES[n] for n in names]


# Import order = pipeline order; each module calls `register`.
from . import load, synth, sample, select, export, train, evaluate  # noqa: E402,F401,I001
from . import recipes  # noqa: E402,F401  (the paper's presets)
