"""Stage `load`: read QA records (MuSiQue, HotpotQA, any dataset in solopo/datasets/) into typed rows."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from solopo.datasets import LOADERS, SHIPPED, load_records, records_to_table, resolve_source
from solopo.pipeline.config import StageConfig, register_preset
from solopo.pipeline.io import file_fingerprint
from solopo.pipeline.stage import Stage

from . import register


class LoadConfig(StageConfig):
    source: str = Field(
        default="musique-sample",
        description=f"path (.jsonl, .jsonl.gz, .json), a datasets hub id, or a shipped sample: {', '.join(SHIPPED)}",
    )
    dataset: str = Field(
        default="auto", description="auto (from the shipped name or the file's schema) or a loader name"
    )
    split: str = Field(default="train", description="hub split; shipped samples carry their own")
    answerable_only: bool = Field(default=True, description="MuSiQue: keep only answerable questions")
    on_bad_record: Literal["fail", "skip"] = Field(
        default="fail", description="a malformed line: stop naming it, or skip it and count it as a drop"
    )
    limit: int | None = Field(default=None, ge=1, description="keep the first N good records")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        import solopo.datasets  # noqa: F401  (registers every loader)

        if v != "auto" and v not in LOADERS:
            raise ValueError(f"unknown dataset {v!r}; known: auto, {', '.join(sorted(LOADERS))}")
        return v


@register
class LoadStage(Stage):
    name = "load"
    Config = LoadConfig
    version = "1"
    writes = ("id", "question", "answer", "answer_aliases", "paragraphs", "decomposition", "dataset")

    def fingerprint(self) -> dict[str, Any]:
        # The file's bytes decide whether the input changed (a hub id can only be named).
        src = resolve_source(self.config.source, self.config.dataset, self.config.split)
        if src.kind == "file":
            return {"source": file_fingerprint(src.location), "dataset": src.dataset}
        return {"source": {"hub": src.location, "split": src.split}, "dataset": src.dataset}

    def run(self, data: pa.Table | None) -> pa.Table:
        c = self.config
        src = resolve_source(c.source, c.dataset, c.split)
        records = load_records(
            c.source,
            dataset=c.dataset,
            split=c.split,
            answerable_only=c.answerable_only,
            on_bad_record=c.on_bad_record,
            limit=c.limit,
            drop=self.ctx.drop,
        )
        if not records:
            from solopo.pipeline.errors import DataError

            raise DataError("no usable records", path=src.location, hint="check load.source and the drop counts above")
        self.ctx.stat("dataset", src.dataset)
        self.ctx.stat("source", src.location)
        self.ctx.stat("records", len(records))
        n_sup = [len(r.supporting) for r in records]
        self.ctx.stat("supporting_per_record_mean", round(sum(n_sup) / len(n_sup), 3))
        self.ctx.stat("paragraphs_per_record_mean", round(sum(len(r.paragraphs) for r in records) / len(records), 3))
        if c.limit is not None:
            self.ctx.note(f"load.limit={c.limit}: kept the first {len(records)} records of {src.location}")
        return records_to_table(records)


register_preset("cpu-demo", {"load": {"limit": 32}})
