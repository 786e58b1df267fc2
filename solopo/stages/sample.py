"""Stage `sample`: CoT answers on the short prompts. (skeleton: owned by issue 3)"""

from __future__ import annotations

from solopo.pipeline.config import StageConfig
from solopo.pipeline.stage import Stage

from . import register


class SampleConfig(StageConfig):
    backend: str = "auto"
    n: int = 32


@register
class SampleStage(Stage):
    name = "sample"
    Config = SampleConfig
    after = "synth"
    reads = ("id", "short_prompt")
    writes = ("id", "samples")
