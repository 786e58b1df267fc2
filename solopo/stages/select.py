"""Stage `select`: chosen/rejected by sub-EM. (skeleton: owned by issue 3)"""

from __future__ import annotations

from solopo.pipeline.config import StageConfig
from solopo.pipeline.stage import Stage

from . import register


class SelectConfig(StageConfig):
    policy: str = "random"


@register
class SelectStage(Stage):
    name = "select"
    Config = SelectConfig
    after = "sample"
    reads = ("id", "samples")
    writes = ("id", "chosen", "rejected")
