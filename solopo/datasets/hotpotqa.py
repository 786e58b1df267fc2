"""HotpotQA (Yang et al., 2018), official distractor-setting JSON (a list, or JSON lines): one file."""

from __future__ import annotations

import json
from typing import Any

from .base import DatasetLoader, Paragraph, QARecord, RecordError, check_record, register_dataset, require


@register_dataset
class HotpotQALoader(DatasetLoader):
    name = "hotpotqa"
    hub_default_split = "validation"

    def looks_like(self, raw: dict[str, Any]) -> bool:
        return "context" in raw and "supporting_facts" in raw

    def parse(self, raw: dict[str, Any]) -> QARecord:
        rid = require(raw, "_id", (str, int))
        question = require(raw, "question", str)
        answer = require(raw, "answer", str)
        context = require(raw, "context", (list, dict))
        facts = require(raw, "supporting_facts", (list, dict))
        # The hub copy stores columns as dicts of lists; the official JSON as lists of pairs.
        if isinstance(context, dict):
            context = list(zip(context.get("title", []), context.get("sentences", []), strict=False))
        if isinstance(facts, dict):
            facts = list(zip(facts.get("title", []), facts.get("sent_id", []), strict=False))
        support_titles = set()
        for i, f in enumerate(facts):
            if not (isinstance(f, (list, tuple)) and len(f) == 2 and isinstance(f[0], str)):
                raise RecordError("bad_field", f"entry {i} is not [title, sentence_id]", field="supporting_facts")
            support_titles.add(f[0])
        paragraphs = []
        for i, c in enumerate(context):
            if not (isinstance(c, (list, tuple)) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list)):
                raise RecordError("bad_field", f"entry {i} is not [title, [sentences]]", field=f"context[{i}]")
            # Official sentences keep their leading spaces, so plain concatenation restores the paragraph.
            text = "".join(str(s) for s in c[1]).strip()
            paragraphs.append(Paragraph(idx=i, title=c[0].strip(), text=text, is_supporting=c[0] in support_titles))
        missing = support_titles - {c[0] for c in context}
        if missing:
            raise RecordError(
                "supporting_title_not_in_context",
                f"supporting titles {sorted(missing)} have no paragraph in context",
                field="supporting_facts",
            )
        rec = QARecord(
            id=str(rid),
            question=question.strip(),
            answer=answer.strip(),
            answer_aliases=[],
            paragraphs=paragraphs,
            decomposition=json.dumps(
                {"type": raw.get("type"), "level": raw.get("level"), "supporting_facts": [list(f) for f in facts]},
                ensure_ascii=False,
            ),
            dataset=self.name,
        )
        # Comparison questions answer yes/no: those words need not appear in any paragraph.
        check_record(rec, exempt_answers=("yes", "no"))
        return rec
