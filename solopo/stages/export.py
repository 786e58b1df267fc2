"""Stage `export`: Parquet triplets + data card. (skeleton: owned by issue 3)"""

from __future__ import annotations

from solopo.pipeline.config import StageConfig
from solopo.pipeline.stage import Stage

from . import register


class ExportConfig(StageConfig):
    trl_view: bool = True


@register
class ExportStage(Stage):
    name = "export"
    Config = ExportConfig
    after = "select"
    reads = ("id", "chosen", "rejected")
    writes = ("id", "short_prompt", "long_prompt", "chosen", "rejected")
