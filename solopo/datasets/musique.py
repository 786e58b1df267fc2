"""MuSiQue (Trivedi et al., 2022), official v1.0 jsonl: the whole loader for one dataset is this file."""

from __future__ import annotations

import json
from typing import Any

from .base import DatasetLoader, Paragraph, QARecord, RecordError, check_record, register_dataset, require


@register_dataset
class MusiqueLoader(DatasetLoader):
    name = "musique"

    def looks_like(self, raw: dict[str, Any]) -> bool:
        return "paragraphs" in raw and "question" in raw and "_id" not in raw

    def is_answerable(self, raw: dict[str, Any]) -> bool:
        return bool(raw.get("answerable", True))

    def parse(self, raw: dict[str, Any]) -> QARecord:
        rid = require(raw, "id", (str, int))
        question = require(raw, "question", str)
        answerable = bool(raw.get("answerable", True))
        # MuSiQue-full's unanswerable records keep the answer field; only answerable ones must have one.
        answer = require(raw, "answer", str) if answerable else str(raw.get("answer") or "")
        aliases = raw.get("answer_aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise RecordError("bad_field", "expected a list of strings", field="answer_aliases")
        paras_raw = require(raw, "paragraphs", list)
        paragraphs = []
        for i, p in enumerate(paras_raw):
            if not isinstance(p, dict):
                raise RecordError("bad_field", f"paragraph {i} is not an object", field=f"paragraphs[{i}]")
            for key, typ in (("title", str), ("paragraph_text", str)):
                if not isinstance(p.get(key), typ):
                    what = "missing" if key not in p else f"not a {typ.__name__}"
                    reason = "missing_field" if key not in p else "bad_field"
                    raise RecordError(reason, f"{what} in paragraph {i}", field=f"paragraphs[{i}].{key}")
            paragraphs.append(
                Paragraph(
                    idx=int(p.get("idx", i)),
                    title=p["title"].strip(),
                    text=p["paragraph_text"].strip(),
                    is_supporting=bool(p.get("is_supporting", False)),
                )
            )
        decomp = raw.get("question_decomposition") or []
        rec = QARecord(
            id=str(rid),
            question=question.strip(),
            answer=answer.strip(),
            answer_aliases=[a.strip() for a in aliases if a.strip()],
            paragraphs=paragraphs,
            decomposition=json.dumps(decomp, ensure_ascii=False),
            dataset=self.name,
            answerable=answerable,
        )
        check_record(rec)
        return rec
