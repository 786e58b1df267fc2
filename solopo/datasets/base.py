"""Typed QA records, the loader interface, and `load_records` (file / shipped sample / hub id).

A dataset is one file in this package: a `DatasetLoader` subclass decorated with `@register_dataset`
that turns one raw record (a dict from a JSON line or a JSON list) into a `QARecord`, raising
`RecordError(field, message)` for bad input. Reading files, line numbers, the fail/skip policy,
duplicate ids and `limit` are handled here, once, for every dataset. (Slightly over ~450 lines: the reader's
bad-input messages — binary, non-UTF-8, truncated gzip, file:line — belong with the reading they guard.)
"""

from __future__ import annotations

import gzip
import json
import re
import string
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa

from solopo.pipeline.errors import ConfigError, DataError
from solopo.resources import resource_path

# The shipped samples' directory (tests read it); the loaders go through resource_path.
DATA_DIR = Path(str(files("solopo").joinpath("data")))

# Shipped samples (credit and licences in solopo/data/README.md): name -> (dataset, split, file).
SHIPPED: dict[str, tuple[str, str, str]] = {
    "musique-sample": ("musique", "train", "musique_ans_train_sample.jsonl"),
    "musique-dev-sample": ("musique", "dev", "musique_ans_dev_sample.jsonl"),
    "hotpotqa-sample": ("hotpotqa", "dev", "hotpotqa_dev_distractor_official_migres200.json"),
}

DropFn = Callable[..., None]  # ctx.drop-compatible: drop(reason, n=1, example=None)


# --- records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Paragraph:
    idx: int
    title: str
    text: str
    is_supporting: bool


@dataclass(frozen=True)
class QARecord:
    id: str
    question: str
    answer: str
    answer_aliases: list[str]
    paragraphs: list[Paragraph]
    decomposition: str  # JSON text (MuSiQue: question_decomposition; HotpotQA: supporting_facts)
    dataset: str
    answerable: bool = True

    @property
    def answers(self) -> list[str]:
        """Answer then aliases, without duplicates or empties (what sub-EM accepts)."""
        out: list[str] = []
        for a in [self.answer, *self.answer_aliases]:
            if a and a not in out:
                out.append(a)
        return out

    @property
    def supporting(self) -> list[Paragraph]:
        return [p for p in self.paragraphs if p.is_supporting]


_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(s: str) -> str:
    """SQuAD/sub-EM normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


_NON_WORD = re.compile(r"[\W_]+")


def match_key(s: str) -> str:
    """Normalization for "does this text contain the answer": like normalize_text, but punctuation
    (any Unicode non-word character, e.g. an en dash) becomes a space so that word boundaries survive
    ("G. Stanley Hall's" -> "g stanley hall s", "1505–1572" -> "1505 1572")."""
    s = _ARTICLES.sub(" ", _NON_WORD.sub(" ", s.lower()))
    return " ".join(s.split())


def contains_answer(text_key: str, answer_keys: list[str]) -> bool:
    """True when an answer occurs in the text as whole words; both sides already passed through
    `match_key` ("1" does not match "1990", "paris" does not match "parisian")."""
    padded = f" {text_key} "
    return any(a and f" {a} " in padded for a in answer_keys)


# --- loader interface -------------------------------------------------------------------------------
class RecordError(Exception):
    """Raised by a loader's `parse` for one bad record; `load_records` adds file and line."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


class DatasetLoader:
    """One dataset's schema. Subclasses set `name` and implement `parse` (and `looks_like`)."""

    name: ClassVar[str]
    hub_default_split: ClassVar[str] = "train"

    def looks_like(self, raw: dict[str, Any]) -> bool:
        """Does a raw record have this dataset's schema? Used to infer `dataset: auto` from a file."""
        return False

    def is_answerable(self, raw: dict[str, Any]) -> bool:
        return True

    def parse(self, raw: dict[str, Any]) -> QARecord:
        """Raw dict -> QARecord; raise RecordError for a bad record."""
        raise NotImplementedError


LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(cls: type[DatasetLoader]) -> type[DatasetLoader]:
    LOADERS[cls.name] = cls()
    return cls


def get_loader(name: str) -> DatasetLoader:
    if name not in LOADERS:
        raise ConfigError([f"load.dataset: unknown dataset {name!r}; known: auto, {', '.join(sorted(LOADERS))}"])
    return LOADERS[name]


def require(raw: dict[str, Any], key: str, typ: type | tuple[type, ...], what: str = "") -> Any:
    """Field access with a clear RecordError for a missing or mistyped field."""
    if key not in raw or raw[key] is None:
        raise RecordError("missing_field", f"missing required field{what}", field=key)
    val = raw[key]
    if not isinstance(val, typ):
        names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise RecordError("bad_field", f"expected {names}, got {type(val).__name__}", field=key)
    return val


def check_record(rec: QARecord, exempt_answers: tuple[str, ...] = ()) -> None:
    """Rules shared by every dataset: text present, a supporting paragraph, the answer findable."""
    if not rec.question.strip():
        raise RecordError("empty_question", "question is empty", field="question")
    if not rec.answerable:
        return  # unanswerable records have neither support nor an answer in the text
    if not rec.answer.strip():
        raise RecordError("empty_answer", "answer is empty", field="answer")
    if not rec.paragraphs:
        raise RecordError("no_paragraphs", "record has no paragraphs", field="paragraphs")
    if not rec.supporting:
        raise RecordError("no_supporting_paragraph", "no paragraph is marked supporting", field="paragraphs")
    if rec.answer.strip().lower() in exempt_answers:
        return
    answers = [match_key(a) for a in rec.answers]
    if not any(contains_answer(match_key(p.title + " " + p.text), answers) for p in rec.paragraphs):
        raise RecordError(
            "answer_not_in_paragraphs",
            f"the answer {rec.answer!r} (or an alias) appears in no paragraph",
            field="answer",
        )


# --- sources ----------------------------------------------------------------------------------------
@dataclass
class _Raw:
    where: str  # "path:line" or "path record #i" for messages
    path: str
    line: int | None
    raw: dict[str, Any] | None
    error: str | None = None
    reason: str = "malformed"


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _not_utf8(e: UnicodeDecodeError) -> str:
    return (
        f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at column {e.start + 1} "
        "(Latin-1/cp1252? convert the file with `iconv -f latin1 -t utf-8`)"
    )


def _iter_file(path: Path) -> Iterator[_Raw]:
    """JSON lines (one record per line, .gz ok) or one JSON list (HotpotQA's official format).
    A binary, truncated or corrupt file is a DataError; a line that is not UTF-8 is one bad record."""
    try:
        yield from _read_file(path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"truncated or corrupt gzip file ({e})",
            path=str(path),
            hint=f"the download or copy was probably cut short: fetch it again (`gzip -t {path}` checks a file)",
        ) from None
    except PermissionError as e:
        raise DataError(f"cannot read the file ({e.strerror})", path=str(path), hint="fix its permissions") from None


def _read_file(path: Path) -> Iterator[_Raw]:
    with _open_bytes(path) as f:
        head = f.read(4096)
    if b"\x00" in head or (path.suffix != ".gz" and head[:2] == b"\x1f\x8b"):
        what = "gzip-compressed data: name it .gz" if head[:2] == b"\x1f\x8b" else "a binary file (NUL bytes)"
        raise DataError(
            f"looks like {what}, not JSON text",
            path=str(path),
            hint="load.source must be a .jsonl, .jsonl.gz or .json file of QA records",
        )
    if head.lstrip().startswith(b"["):
        try:
            with _open_bytes(path) as f:
                blob = f.read()
            data = json.loads(blob.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(_not_utf8(e), path=str(path), line=blob.count(b"\n", 0, e.start) + 1) from None
        except json.JSONDecodeError as e:
            raise DataError(
                f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                path=str(path),
                line=e.lineno,
                hint="the file starts with '[' so it is read as one JSON list; fix it or convert it to JSON lines",
            ) from None
        for i, raw in enumerate(data):
            ok = isinstance(raw, dict)
            yield _Raw(
                f"{path} record #{i}",
                str(path),
                None,
                raw if ok else None,
                None if ok else f"record #{i} is a {type(raw).__name__}, not an object",
            )
        return
    with _open_bytes(path) as f:
        for lineno, raw_line in enumerate(f, 1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _Raw(f"{path}:{lineno}", str(path), lineno, None, _not_utf8(e), reason="not_utf8")
                continue
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                yield _Raw(f"{path}:{lineno}", str(path), lineno, None, f"malformed JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(raw, dict):
                yield _Raw(
                    f"{path}:{lineno}", str(path), lineno, None, f"line holds a {type(raw).__name__}, not a JSON object"
                )
                continue
            yield _Raw(f"{path}:{lineno}", str(path), lineno, raw)


def _iter_hub(hub_id: str, split: str) -> Iterator[_Raw]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a base dependency
        from solopo.pipeline.errors import MissingDependencyError

        raise MissingDependencyError("datasets", "pip install datasets") from None
    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline machines, unknown ids, missing splits: all end here
        raise DataError(
            f"could not load the hub dataset {hub_id!r} (split {split!r}): {type(e).__name__}: {e}",
            hint="with no network, download the official jsonl once and pass its path as load.source / --data",
        ) from None
    for i, raw in enumerate(ds):
        yield _Raw(f"{hub_id}[{split}] row {i}", hub_id, i + 1, dict(raw))


def is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.endswith((".json", ".jsonl", ".gz"))


@dataclass
class ResolvedSource:
    kind: Literal["file", "hub"]
    location: str  # file path or hub id
    dataset: str
    split: str
    fingerprint: dict[str, Any] = field(default_factory=dict)


def resolve_source(source: str, dataset: str = "auto", split: str = "train") -> ResolvedSource:
    """A shipped name, an existing path, or a hub id -> where to read and which loader to use."""
    if source in SHIPPED:
        ds, sp, fname = SHIPPED[source]
        if dataset not in ("auto", ds):
            raise ConfigError(
                [
                    f"load.source {source!r} is a {ds} sample but load.dataset is {dataset!r}; "
                    f"set load.dataset=auto or {ds}"
                ]
            )
        return ResolvedSource("file", str(resource_path("data", fname)), ds, sp)
    p = Path(source).expanduser()
    if p.exists():
        if p.is_dir():
            raise DataError("is a directory; point load.source at a .jsonl, .jsonl.gz or .json file", path=str(p))
        ds = dataset if dataset != "auto" else _sniff(p)
        get_loader(ds)
        return ResolvedSource("file", str(p.resolve()), ds, split)
    if is_hub_id(source):
        if dataset == "auto":
            raise ConfigError(
                [
                    f"load.source {source!r} is a hub id: set load.dataset "
                    f"({', '.join(sorted(LOADERS))}) so the schema is known"
                ]
            )
        get_loader(dataset)
        return ResolvedSource("hub", source, dataset, split)
    raise DataError(
        "no such file, shipped sample or hub id",
        path=source,
        hint=f"shipped samples: {', '.join(SHIPPED)}; or a .jsonl/.jsonl.gz/.json path; or owner/name on the hub",
    )


def _sniff(path: Path) -> str:
    for item in _iter_file(path):
        if item.raw is None:
            continue
        for name, loader in LOADERS.items():
            if loader.looks_like(item.raw):
                return name
        break
    raise DataError(
        "cannot tell which dataset this file holds from its first record",
        path=str(path),
        hint=f"set load.dataset to one of {', '.join(sorted(LOADERS))}",
    )


# --- the entry point ----------------------------------------------------------------------------
def load_records(
    source: str,
    dataset: str = "auto",
    split: str = "train",
    answerable_only: bool = True,
    on_bad_record: Literal["fail", "skip"] = "fail",
    limit: int | None = None,
    drop: DropFn | None = None,
) -> list[QARecord]:
    """Read QA records. A bad record raises DataError (file, line, field, what to do) under
    on_bad_record="fail"; under "skip" it is counted through `drop(reason, example=where)`.
    Duplicate ids are bad records too. `limit` keeps the first N good records."""
    if on_bad_record not in ("fail", "skip"):
        raise ConfigError([f"load.on_bad_record must be fail or skip, got {on_bad_record!r}"])
    src = resolve_source(source, dataset, split)
    loader = get_loader(src.dataset)
    items = _iter_file(Path(src.location)) if src.kind == "file" else _iter_hub(src.location, src.split)
    out: list[QARecord] = []
    seen: dict[str, str] = {}

    def bad(item: _Raw, reason: str, message: str, field: str | None = None) -> None:
        if on_bad_record == "fail":
            raise DataError(
                message,
                path=item.path,
                line=item.line,
                field=field,
                hint="fix the record, or pass --on-bad-record skip to drop bad records",
            )
        if drop is not None:
            drop(f"bad_record:{reason}", example=item.where)

    for item in items:
        if limit is not None and len(out) >= limit:
            break
        if item.raw is None:
            bad(item, item.reason, item.error or "unreadable record")
            continue
        if answerable_only and not loader.is_answerable(item.raw):
            if drop is not None:
                drop("unanswerable", example=str(item.raw.get("id", item.where)))
            continue
        try:
            rec = loader.parse(item.raw)
        except RecordError as e:
            # Records of a JSON list have no line of their own: name their index instead.
            msg = e.message if item.line else f"{item.where[len(item.path) :].strip()}: {e.message}"
            bad(item, e.reason, msg, e.field)
            continue
        if rec.id in seen:
            bad(item, "duplicate_id", f"duplicate id {rec.id!r} (first seen at {seen[rec.id]})", "id")
            continue
        seen[rec.id] = item.where
        out.append(rec)
    return out


# --- Arrow conversion -------------------------------------------------------------------------------
PARAGRAPH_TYPE = pa.struct(
    [("idx", pa.int32()), ("title", pa.string()), ("text", pa.string()), ("is_supporting", pa.bool_())]
)
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_aliases", pa.list_(pa.string())),
        ("paragraphs", pa.list_(PARAGRAPH_TYPE)),
        ("decomposition", pa.string()),
        ("dataset", pa.string()),
        ("answerable", pa.bool_()),
    ]
)


def records_to_table(records: list[QARecord]) -> pa.Table:
    cols: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}
    for r in records:
        cols["id"].append(r.id)
        cols["question"].append(r.question)
        cols["answer"].append(r.answer)
        cols["answer_aliases"].append(list(r.answer_aliases))
        cols["paragraphs"].append(
            [{"idx": p.idx, "title": p.title, "text": p.text, "is_supporting": p.is_supporting} for p in r.paragraphs]
        )
        cols["decomposition"].append(r.decomposition)
        cols["dataset"].append(r.dataset)
        cols["answerable"].append(r.answerable)
    return pa.table(cols, schema=RECORD_SCHEMA)


def table_to_records(table: pa.Table) -> list[QARecord]:
    """Inverse of records_to_table; tolerates tables without the optional columns."""
    d = table.to_pydict()
    n = table.num_rows
    get = lambda k, default: d[k] if k in d else [default] * n  # noqa: E731
    out = []
    for i in range(n):
        paras = [
            Paragraph(int(p["idx"]), p["title"] or "", p["text"] or "", bool(p["is_supporting"]))
            for p in d["paragraphs"][i]
        ]
        out.append(
            QARecord(
                id=str(d["id"][i]),
                question=d["question"][i],
                answer=d["answer"][i],
                answer_aliases=list(get("answer_aliases", [])[i] or []),
                paragraphs=paras,
                decomposition=get("decomposition", "[]")[i],
                dataset=get("dataset", "unknown")[i],
                answerable=bool(get("answerable", True)[i]),
            )
        )
    return out
