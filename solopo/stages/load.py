"""Stage `load`: read QA records (MuSiQue, HotpotQA) into typed rows. (skeleton: owned by issue 2)"""

from __future__ import annotations

from typing import Literal

from solopo.pipeline.config import StageConfig
from solopo.pipeline.stage import Stage

from . import register


class LoadConfig(StageConfig):
    source: str = "musique-sample"  # path (.jsonl/.jsonl.gz/.json), datasets hub id, or a shipped sample name
    dataset: Literal["musique", "hotpotqa"] = "musique"
    split: str = "train"
    answerable_only: bool = True
    on_bad_record: Literal["fail", "skip"] = "fail"
    limit: int | None = None


@register
class LoadStage(Stage):
    name = "load"
    Config = LoadConfig
    writes = ("id", "question", "answer", "answer_aliases", "paragraphs", "decomposition", "dataset")
