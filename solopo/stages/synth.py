"""Stage `synth`: short and RULER-style long contexts. (skeleton: owned by issue 2)"""

from __future__ import annotations

from solopo.pipeline.config import StageConfig
from solopo.pipeline.stage import Stage

from . import register


class SynthConfig(StageConfig):
    target_len: list[int] = [8192]


@register
class SynthStage(Stage):
    name = "synth"
    Config = SynthConfig
    after = "load"
    reads = ("id", "question", "answer", "answer_aliases", "paragraphs")
    writes = ("id", "question", "answers", "short_prompt", "long_prompt", "short_tokens", "long_tokens", "target_len")
