"""Stage `train`: SoLoPO training. (skeleton: owned by issue 4)"""

from __future__ import annotations

from typing import Literal

from solopo.pipeline.config import StageConfig
from solopo.pipeline.stage import Stage

from . import register


class TrainConfig(StageConfig):
    algo: Literal["dpo", "simpo", "orpo"] = "orpo"
    mode: Literal["solo", "long", "expand-long", "short"] = "solo"
    alpha: float | None = None


@register
class TrainStage(Stage):
    name = "train"
    Config = TrainConfig
    after = "export"
    reads = ("id", "short_prompt", "long_prompt", "chosen", "rejected")
    writes = ("model_path",)
