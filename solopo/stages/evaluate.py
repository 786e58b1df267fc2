"""Stage `eval`: long-context QA at several lengths. (skeleton: owned by issue 5)"""

from __future__ import annotations

from solopo.pipeline.config import StageConfig
from solopo.pipeline.stage import Stage

from . import register


class EvalConfig(StageConfig):
    lengths: list[int] = [4096, 8192]


@register
class EvalStage(Stage):
    name = "eval"
    Config = EvalConfig
    after = "train"
    reads = ("model_path",)
    writes = ("model", "dataset", "target_len", "sub_em")
