"""Loaders: shipped samples, file formats, every kind of bad input, the fail/skip policy, the stage config."""

from __future__ import annotations

import copy
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from solopo.datasets import (
    SHIPPED,
    QARecord,
    load_records,
    match_key,
    normalize_text,
    records_to_table,
    table_to_records,
)
from solopo.datasets.base import DATA_DIR
from solopo.pipeline.errors import ConfigError, DataError

MUSIQUE = DATA_DIR / "musique_ans_train_sample.jsonl"


def _raw_musique(n: int = 3) -> list[dict]:
    with open(MUSIQUE) as f:
        return [json.loads(next(f)) for _ in range(n)]


def _write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw_lines or {}).items():
        lines.insert(i, text)
    path.write_text("\n".join(lines) + "\n")
    return path


class Drops:
    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def __call__(self, reason: str, n: int = 1, example: str | None = None) -> None:
        self.counts[reason] += n
        if example is not None:
            self.examples.setdefault(reason, []).append(example)


def test_shipped_samples_load_as_typed_records():
    counts = {name: len(load_records(name)) for name in SHIPPED}
    assert counts == {"musique-sample": 150, "musique-dev-sample": 149, "hotpotqa-sample": 200}
    rec = load_records("musique-sample", limit=1)[0]
    assert isinstance(rec, QARecord)
    assert rec.id == "2hop__150763_14904"
    assert rec.answers == ["G. Stanley Hall", "Stanley Hall"]
    assert len(rec.paragraphs) == 20 and 2 <= len(rec.supporting) <= 4
    assert json.loads(rec.decomposition)[0]["answer"] == "American Psychological Association"
    hp = load_records("hotpotqa-sample", limit=1)[0]
    assert hp.dataset == "hotpotqa" and hp.answer == "Rush"
    assert {p.title for p in hp.supporting} == {"Nobody's Hero", "Neil Peart"}
    assert not hp.paragraphs[0].text.startswith(" ")  # sentences are joined, leading spaces kept inside


def test_table_roundtrip_and_schema():
    recs = load_records("musique-sample", limit=5)
    table = records_to_table(recs)
    assert table.column_names[:7] == [
        "id",
        "question",
        "answer",
        "answer_aliases",
        "paragraphs",
        "decomposition",
        "dataset",
    ]
    assert str(table.schema.field("paragraphs").type) == (
        "list<item: struct<idx: int32, title: string, text: string, is_supporting: bool>>"
    )
    assert table_to_records(table) == recs


def test_jsonl_gz_path_and_dataset_sniffing(tmp_path):
    gz = tmp_path / "musique_part.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        for r in _raw_musique(4):
            f.write(json.dumps(r) + "\n")
    recs = load_records(str(gz))  # dataset=auto: sniffed from the first record
    assert [r.dataset for r in recs] == ["musique"] * 4
    assert recs[0].id == "2hop__150763_14904"
    hp = tmp_path / "hotpot.json"
    data = json.loads((DATA_DIR / "hotpotqa_dev_distractor_official_migres200.json").read_text())[:3]
    hp.write_text(json.dumps(data))
    assert [r.dataset for r in load_records(str(hp))] == ["hotpotqa"] * 3


def test_normalization():
    assert normalize_text("The  U.S. Army!") == "us army"
    assert match_key("G. Stanley Hall's (1505–1572)") == "g stanley hall s 1505 1572"


@pytest.mark.parametrize(
    "mutate, reason, field, needle",
    [
        (lambda r: r.pop("question"), "missing_field", "question", "missing required field"),
        (lambda r: r.update(paragraphs="oops"), "bad_field", "paragraphs", "expected list"),
        (
            lambda r: r["paragraphs"][3].pop("paragraph_text"),
            "missing_field",
            "paragraphs[3].paragraph_text",
            "missing",
        ),
        (
            lambda r: [p.update(is_supporting=False) for p in r["paragraphs"]],
            "no_supporting_paragraph",
            "paragraphs",
            "no paragraph is marked supporting",
        ),
        (
            lambda r: r.update(answer="Zanzibar Quux", answer_aliases=[]),
            "answer_not_in_paragraphs",
            "answer",
            "appears in no paragraph",
        ),
    ],
)
def test_bad_records_fail_with_file_line_field(tmp_path, mutate, reason, field, needle):
    rows = _raw_musique(3)
    mutate(rows[1])
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_records(str(path))
    msg = str(e.value)
    assert f"{path}:2" in msg and f"field '{field}'" in msg and needle in msg
    assert "--on-bad-record skip" in msg
    drops = Drops()
    recs = load_records(str(path), on_bad_record="skip", drop=drops)
    assert [r.id for r in recs] == [rows[0]["id"], rows[2]["id"]]
    assert drops.counts == Counter({f"bad_record:{reason}": 1})
    assert drops.examples[f"bad_record:{reason}"] == [f"{path}:2"]


def test_malformed_line_and_duplicate_id(tmp_path):
    rows = _raw_musique(3)
    rows.append(copy.deepcopy(rows[0]))  # same id again on line 5 (line 3 is the malformed one)
    path = _write_jsonl(tmp_path / "m.jsonl", rows, raw_lines={2: '{"id": "x", "question": '})
    with pytest.raises(DataError, match=r"m\.jsonl:3: malformed JSON"):
        load_records(str(path))
    drops = Drops()
    recs = load_records(str(path), on_bad_record="skip", drop=drops)
    assert len(recs) == 3
    assert drops.counts == Counter({"bad_record:malformed": 1, "bad_record:duplicate_id": 1})
    # fail policy on a file whose only problem is the duplicate
    dup = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl:4: field 'id': duplicate id .*first seen at .*d\.jsonl:1\)"):
        load_records(str(dup))


def test_unanswerable_kept_only_on_request(tmp_path):
    rows = _raw_musique(2)
    rows[1]["answerable"] = False
    for p in rows[1]["paragraphs"]:
        p["is_supporting"] = False  # MuSiQue-full's unanswerable records have no support
    path = _write_jsonl(tmp_path / "u.jsonl", rows)
    drops = Drops()
    assert len(load_records(str(path), drop=drops)) == 1
    assert drops.counts == Counter({"unanswerable": 1})
    both = load_records(str(path), answerable_only=False)
    assert [r.answerable for r in both] == [True, False]


def test_hotpotqa_yes_no_and_bad_support(tmp_path):
    data = json.loads((DATA_DIR / "hotpotqa_dev_distractor_official_migres200.json").read_text())
    yes_no = [r for r in data if r["answer"] in ("yes", "no")]
    assert yes_no, "the shipped sample has comparison questions"
    assert len(load_records(str(_dump(tmp_path / "yn.json", yes_no[:2])))) == 2  # exempt from the answer check
    bad = copy.deepcopy(data[:2])
    bad[1]["supporting_facts"].append(["No Such Title", 0])
    with pytest.raises(DataError, match=r"record #1.*supporting titles \['No Such Title'\]"):
        load_records(str(_dump(tmp_path / "bad.json", bad)))


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_sources_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such file, shipped sample or hub id"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="is a musique sample but load.dataset is 'hotpotqa'"):
        load_records("musique-sample", dataset="hotpotqa")
    with pytest.raises(ConfigError, match="hub id: set load.dataset"):
        load_records("someone/musique")
    # Tests run offline (conftest): a hub id must fail with a message that says what to do.
    with pytest.raises(
        DataError, match="could not load the hub dataset 'someone/musique'.*download the official jsonl"
    ):
        load_records("someone/musique", dataset="musique")


def test_limit_keeps_first_good_records():
    recs = load_records("musique-sample", limit=7)
    assert [r.id for r in recs] == [r.id for r in load_records("musique-sample")[:7]]


def test_load_config_validation():
    from solopo.api import build_config

    cfg = build_config(overrides=["load.source=musique-dev-sample", "load.limit=5"])
    assert cfg.load.source == "musique-dev-sample" and cfg.load.limit == 5
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["load.dataset=squad", "load.on_bad_record=ignore", "load.colour=red"])
    msg = str(e.value)
    assert "3 config problem(s)" in msg and "unknown dataset 'squad'" in msg and "load.colour: unknown key" in msg
    assert build_config(preset="cpu-demo").load.limit == 32
