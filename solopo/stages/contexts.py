"""The context builder behind stage `synth` (and eval): x_short and RULER-style x_long of exact token lengths.

Pure apart from its callbacks (drop / stat / note): `build_contexts(records, tokenizer, SynthConfig(...))` gives
one row per (question, target length). The stage that runs it over a run directory is solopo.stages.synth.

Over ~450 lines on purpose: it is one algorithm (exact cached token counts, candidate order, window search, the
parallel plan), and ContextBuilder's methods share its count tables; split, each part would be read only with the
others.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from solopo.chat import ChatFormat
from solopo.datasets import QARecord, contains_answer, match_key, table_to_records
from solopo.pipeline.config import StageConfig, parse_lengths
from solopo.pipeline.errors import DataError
from solopo.prompts import DOC_SEPARATOR, DOC_TEMPLATE, PROMPT_TEMPLATE

_DOC_FIELDS = {"i", "title", "text"}


class SynthConfig(StageConfig):
    target_len: list[int] = Field(default=[8192], description="long-context lengths in tokens: 8k, [4k, 8k], 8192")
    short_docs: Literal["supporting", "own"] = Field(
        default="supporting",
        description="x_short: the supporting paragraphs (paper's formal x_short) or all of the question's own paragraphs",
    )
    tolerance: float = Field(default=0.02, ge=0.0, lt=1.0, description="long tokens in [target*(1-tol), target]")
    gold_position: Literal["random"] | float = Field(
        default="random", description="random, or a depth in 0..1 where the gold documents sit as one block"
    )
    doc_template: str = Field(default=DOC_TEMPLATE, description="one document; fields {i}, {title}, {text}")
    prompt_template: str = Field(
        default=PROMPT_TEMPLATE, description="the user message; fields {documents}, {question}"
    )
    on_unreachable: Literal["fail", "skip"] = Field(
        default="fail", description="a question whose contexts cannot reach target_len: stop, or skip it as a drop"
    )
    verify_sample: int = Field(default=64, ge=0, description="prompts re-tokenized in full to check the counts")
    num_proc: int = Field(default=1, ge=1, description="processes for distractor selection")
    shard_size: int | None = Field(default=2000, ge=1, description="questions per resumable shard")
    max_misses: int = Field(
        default=512, ge=1, description="distractors that do not fit, tried for a fit or a swap before giving up"
    )

    @field_validator("target_len", mode="before")
    @classmethod
    def _lengths(cls, v: Any) -> list[int]:
        return parse_lengths(v)

    @field_validator("gold_position", mode="before")
    @classmethod
    def _depth(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() != "random":
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"gold_position must be 'random' or a depth between 0 and 1, got {v!r}") from None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"gold_position depth must be between 0 and 1, got {v}")
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("doc_template")
    @classmethod
    def _doc_template(cls, v: str) -> str:
        names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        unknown = names - _DOC_FIELDS
        if unknown or "text" not in names:
            raise ValueError(
                f"doc_template may use {{i}}, {{title}}, {{text}} and must use {{text}}; got fields {sorted(names)}"
            )
        return v

    @field_validator("prompt_template")
    @classmethod
    def _prompt_template(cls, v: str) -> str:
        names = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        if sorted(names) != ["documents", "question"]:
            raise ValueError(f"prompt_template must use {{documents}} and {{question}} once each; got {names}")
        return v


# --- token counting ---------------------------------------------------------------------------------
class TokenCounter:
    """Counts tokens the way the model will see a user message: the run's chat format (template, system message)
    + generation prompt, as solopo.chat renders it for sampling, training and eval."""

    def __init__(self, tokenizer: Any, chat: ChatFormat | None = None):
        self.tokenizer = tokenizer
        self.chat_format = chat or ChatFormat()
        self.has_chat_template = self.chat_format.has_template(tokenizer)
        self._fast = getattr(tokenizer, "backend_tokenizer", None)

    def chat(self, content: str) -> str:
        if not self.has_chat_template:
            return content
        return self.chat_format.render(self.tokenizer, content)

    def count(self, texts: Sequence[str], batch: int = 2048) -> np.ndarray:
        """Token counts of raw strings, no special tokens added (chat templates carry their own)."""
        out = np.zeros(len(texts), dtype=np.int64)
        for s in range(0, len(texts), batch):
            chunk = list(texts[s : s + batch])
            if self._fast is not None:
                enc = self._fast.encode_batch(chunk, add_special_tokens=False)
                out[s : s + len(chunk)] = [len(e.ids) for e in enc]
            else:
                ids = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
                out[s : s + len(chunk)] = [len(x) for x in ids]
        return out

    def count_chat(self, contents: Sequence[str]) -> np.ndarray:
        return self.count([self.chat(c) for c in contents])


def _follow_word(doc_template: str) -> str:
    """The first word of every document ("Document"): appended after a piece so that the separator is
    tokenized as it is in context (a trailing "\\n\\n" alone can become one token, "\\n\\nDocument" two)."""
    lead = ""
    for literal, _f, _, _ in string.Formatter().parse(doc_template):
        lead = literal
        break
    words = lead.split()
    return words[0] if words else "X"


# --- the builder ------------------------------------------------------------------------------------
def _rng(seed: int, *parts: Any) -> np.random.Generator:
    """Per-question generator: the same question gets the same context in any shard or process."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


@dataclass
class _Plan:
    rec_i: int
    target: int
    docs: list[int]  # paragraph ids in prompt order
    gold_positions: list[int]
    long_tokens: int


class ContextBuilder:
    """Builds short/long prompts for any records against a distractor pool (default: the records).

    Tokenizes each distinct paragraph once; reuse one builder for several calls (shards, eval sets)."""

    def __init__(
        self,
        tokenizer: Any,
        config: SynthConfig,
        seed: int = 0,
        pool: Sequence[QARecord] | pa.Table | None = None,
        progress: bool = True,
        chat: ChatFormat | None = None,
    ):
        self.config = config
        self.seed = seed
        self.progress = progress
        self.counter = TokenCounter(tokenizer, chat)
        self.sep = DOC_SEPARATOR
        self.follow = _follow_word(config.doc_template)
        self._follow_count = int(self.counter.count([self.follow])[0])
        # paragraph registry: (title, text) -> id
        self._pid: dict[tuple[str, str], int] = {}
        self.titles: list[str] = []
        self.texts: list[str] = []
        self.title_keys: list[str] = []
        self.text_keys: list[str] = []
        self.piece = np.zeros(0, dtype=np.int64)
        self._idx_delta = np.zeros(1, dtype=np.int64)  # [0] unused; [j] for document number j
        self._idx_cum = np.zeros(1, dtype=np.int64)
        self._grow_index(512)
        pool_records = _as_records(pool) if pool is not None else []
        self.pool_ids = np.array(self._register([p for r in pool_records for p in r.paragraphs]), dtype=np.int64)
        self.pool_ids = np.unique(self.pool_ids) if len(self.pool_ids) else self.pool_ids

    # -- counting --------------------------------------------------------------------------------
    def render(self, i: int, pid: int) -> str:
        return self.config.doc_template.format(i=i, title=self.titles[pid], text=self.texts[pid])

    def _piece_strings(self, pids: Sequence[int]) -> list[str]:
        return [self.render(1, p) + self.sep + self.follow for p in pids]

    def _register(self, paragraphs: Sequence[Any]) -> list[int]:
        """Ids for paragraphs (title, text); new ones are tokenized together in one batch."""
        ids, new = [], []
        for p in paragraphs:
            key = (p.title, p.text)
            pid = self._pid.get(key)
            if pid is None:
                pid = len(self.titles)
                self._pid[key] = pid
                self.titles.append(p.title)
                self.texts.append(p.text)
                self.title_keys.append(match_key(p.title))
                self.text_keys.append(match_key(p.title + " " + p.text))
                new.append(pid)
            ids.append(pid)
        if new:
            counts = self._count_progress(self._piece_strings(new), "tokenizing paragraphs")
            self.piece = np.concatenate([self.piece, counts - self._follow_count])
        return ids

    def _count_progress(self, texts: list[str], desc: str) -> np.ndarray:
        if len(texts) < 20000 or not self.progress:
            return self.counter.count(texts)
        from tqdm.auto import tqdm

        out, step = [], 10000
        for s in tqdm(range(0, len(texts), step), desc=desc, unit_scale=step, leave=False):
            out.append(self.counter.count(texts[s : s + step]))
        return np.concatenate(out)

    def _grow_index(self, n: int) -> None:
        """index_delta[j] = tokens of a document numbered j minus the same document numbered 1."""
        have = len(self._idx_delta) - 1
        if n <= have:
            return
        n = max(n, 2 * have)
        dummy = self.config.doc_template.format(i="{i}", title="Title", text="Text.")
        strings = [dummy.replace("{i}", str(j)) + self.sep + self.follow for j in range(1, n + 1)]
        counts = self.counter.count(strings)
        self._idx_delta = np.concatenate([[0], counts - counts[0]])
        self._idx_cum = np.cumsum(self._idx_delta)

    def idx_cum(self, n: int) -> int:
        """Sum of index deltas for documents numbered 1..n."""
        if n >= len(self._idx_cum):
            self._grow_index(n + 1)
        return int(self._idx_cum[n])

    def idx_delta(self, j: int) -> int:
        if j >= len(self._idx_delta):
            self._grow_index(j + 1)
        return int(self._idx_delta[j])

    # -- prompts ---------------------------------------------------------------------------------
    def prompt(self, pids: Sequence[int], question: str) -> str:
        docs = [self.render(j, p) for j, p in enumerate(pids, 1)]
        return self.config.prompt_template.format(documents=self.sep.join(docs), question=question)

    def _gold(self, rec: QARecord) -> list[Any]:
        return rec.supporting if self.config.short_docs == "supporting" else list(rec.paragraphs)

    def _candidates(self, rec: QARecord, gold_ids: list[int], own_ids: list[int]) -> Iterator[int]:
        """Distractor order: own non-supporting paragraphs first (short_docs=supporting), then the pool;
        never a gold title, never a paragraph holding an answer, never a repeat."""
        rng = _rng(self.seed, rec.id)
        used = set(gold_ids)
        gold_titles = {self.title_keys[g] for g in gold_ids}
        answers = [match_key(a) for a in rec.answers]

        def ok(pid: int) -> bool:
            if pid in used or self.title_keys[pid] in gold_titles:
                return False
            return not contains_answer(self.text_keys[pid], answers)

        own = [p for p in own_ids if p not in used]
        rng.shuffle(own)
        for pid in own:
            if ok(pid):
                used.add(pid)
                yield pid
        for j in _random_order(rng, len(self.pool_ids)):
            pid = int(self.pool_ids[j])
            if ok(pid):
                used.add(pid)
                yield pid

    def plan(self, rec: QARecord, rec_i: int, short_tokens: int, drop: Callable[..., None] | None) -> list[_Plan]:
        """Choose the documents and their order for every target length of one question."""
        cfg = self.config
        gold = self._gold(rec)
        gold_ids = [self._pid[(p.title, p.text)] for p in gold]
        own_ids = [self._pid[(p.title, p.text)] for p in rec.paragraphs if not p.is_supporting]
        k = len(gold_ids)
        # Everything in the short prompt that is not a document piece: chat template, instruction, question.
        overhead = short_tokens - int(self.piece[gold_ids].sum()) - self.idx_cum(k)
        stream = self._candidates(rec, gold_ids, own_ids if cfg.short_docs == "supporting" else [])
        seen: list[int] = []  # the filtered candidate stream, materialized once and shared by all targets

        def cand(i: int) -> int | None:
            while len(seen) <= i:
                nxt = next(stream, None)
                if nxt is None:
                    return None
                seen.append(nxt)
            return seen[i]

        plans = []
        for target in cfg.target_len:
            lo = math.ceil(target * (1 - cfg.tolerance))
            total = overhead + int(self.piece[gold_ids].sum()) + self.idx_cum(k)
            if total > target:
                self._unreachable(
                    rec, target, "target_below_short_prompt", f"the short prompt alone has {total} tokens", drop
                )
                continue
            chosen: list[int] = []
            skipped: list[int] = []  # candidates that did not fit: material for a swap
            i = 0
            while True:
                c = cand(i)
                if c is None:
                    break
                i += 1
                cost = int(self.piece[c]) + self.idx_delta(k + len(chosen) + 1)
                if total + cost <= target:
                    chosen.append(c)
                    total += cost
                    continue
                skipped.append(c)
                if total >= lo or len(skipped) > cfg.max_misses:
                    break
                # Under the window and the next one overflows: swapping one chosen distractor for a
                # longer skipped one lands inside far more often than waiting for a short paragraph.
                if len(skipped) % 16 == 0 and self._swap(chosen, skipped, lo - total, target - total):
                    total = overhead + int(self.piece[gold_ids].sum()) + int(self.piece[chosen].sum())
                    total += self.idx_cum(k + len(chosen))
                    break
            if total < lo and self._swap(chosen, skipped, lo - total, target - total):  # last chance
                total = overhead + int(self.piece[gold_ids].sum()) + int(self.piece[chosen].sum())
                total += self.idx_cum(k + len(chosen))
            if total < lo:
                why = "pool_exhausted" if cand(i) is None else "no_fit_within_tolerance"
                self._unreachable(rec, target, why, f"reached {total} tokens, need at least {lo}", drop)
                continue
            docs, gold_pos = _arrange(gold_ids, chosen, cfg.gold_position, _rng(self.seed, rec.id, target))
            plans.append(_Plan(rec_i, target, docs, gold_pos, total))
        return plans

    def _swap(self, chosen: list[int], skipped: list[int], gap_lo: int, gap_hi: int) -> bool:
        """Replace one chosen distractor d by a skipped c with piece[c] - piece[d] in [gap_lo, gap_hi]."""
        if not chosen:
            return False
        order = sorted(range(len(skipped)), key=lambda j: int(self.piece[skipped[j]]))
        costs = [int(self.piece[skipped[j]]) for j in order]
        for pos, d in enumerate(chosen):
            want_lo, want_hi = int(self.piece[d]) + gap_lo, int(self.piece[d]) + gap_hi
            j = bisect.bisect_left(costs, want_lo)
            if j < len(costs) and costs[j] <= want_hi:
                chosen[pos] = skipped[order[j]]
                return True
        return False

    def _unreachable(self, rec: QARecord, target: int, reason: str, detail: str, drop) -> None:
        if self.config.on_unreachable == "fail":
            hint = {
                "target_below_short_prompt": "raise synth.target_len above the short prompt",
                "pool_exhausted": "give a larger pool (more records) or a smaller target",
                "no_fit_within_tolerance": "raise synth.tolerance or synth.max_misses",
            }[reason]
            raise DataError(
                f"question {rec.id!r}: cannot build a {target}-token context: {detail} ({reason})",
                field="synth.target_len",
                hint=f"{hint}, or set synth.on_unreachable=skip to drop such questions with a count",
            )
        if drop is not None:
            drop(f"unreachable:{reason}:{target}", example=rec.id)

    # -- the whole call --------------------------------------------------------------------------
    def build(
        self,
        records: Sequence[QARecord] | pa.Table,
        drop: Callable[..., None] | None = None,
        stat: Callable[..., None] | None = None,
        note: Callable[[str], None] | None = None,
    ) -> pa.Table:
        recs = _as_records(records)
        usable = []
        for r in recs:
            if not r.supporting:
                if drop is not None:
                    drop("no_supporting_paragraph", example=r.id)
                continue
            usable.append(r)
        # Own paragraphs of every record get ids (and counts) even when they are not in the pool.
        self._register([p for r in usable for p in r.paragraphs])
        if not self.counter.has_chat_template and note is not None:
            note("the tokenizer has no chat template: prompts are counted as plain text")
        shorts = [self.prompt([self._pid[(p.title, p.text)] for p in self._gold(r)], r.question) for r in usable]
        short_tokens = self.counter.count_chat(shorts)

        plans = self._plan_all(usable, short_tokens, drop)
        rows: dict[str, list[Any]] = {k: [] for k in SYNTH_SCHEMA.names}
        for pl in plans:
            r = usable[pl.rec_i]
            st = int(short_tokens[pl.rec_i])
            rows["id"].append(r.id)
            rows["question"].append(r.question)
            rows["answers"].append(r.answers)
            rows["short_prompt"].append(shorts[pl.rec_i])
            rows["long_prompt"].append(self.prompt(pl.docs, r.question))
            rows["short_tokens"].append(st)
            rows["long_tokens"].append(pl.long_tokens)
            rows["target_len"].append(pl.target)
            rows["gold_positions"].append(pl.gold_positions)
            rows["n_docs"].append(len(pl.docs))
            rows["n_gold"].append(len(pl.gold_positions))
            rows["rho"].append(st / pl.long_tokens)
            rows["dataset"].append(r.dataset)
        table = pa.table(rows, schema=SYNTH_SCHEMA)
        if stat is not None:
            self._verify(table, stat, note)
        return table

    def _plan_all(self, usable: list[QARecord], short_tokens: np.ndarray, drop) -> list[_Plan]:
        n_proc = min(self.config.num_proc, max(1, len(usable) // 200))
        if n_proc > 1:
            return _parallel_plan(self, usable, short_tokens, n_proc, drop)
        it: Any = range(len(usable))
        if self.progress and len(usable) >= 500:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="selecting distractors", unit="q", leave=False)
        plans: list[_Plan] = []
        for i in it:
            plans.extend(self.plan(usable[i], i, int(short_tokens[i]), drop))
        return plans

    def _verify(self, table: pa.Table, stat: Callable[..., None], note) -> None:
        """Re-tokenize a random sample of long prompts in full; record the largest deviation."""
        n = min(self.config.verify_sample, table.num_rows)
        if n == 0:
            return
        idx = sorted(random.Random(self.seed).sample(range(table.num_rows), n))
        prompts = table.column("long_prompt").take(idx).to_pylist()
        est = np.asarray(table.column("long_tokens").take(idx).to_pylist())
        targets = np.asarray(table.column("target_len").take(idx).to_pylist())
        real = self.counter.count_chat(prompts)
        dev = np.abs(real - est)
        lo = np.ceil(targets * (1 - self.config.tolerance))
        outside = int(((real < lo) | (real > targets)).sum())
        stat("verify_prompts", n, "sum")
        stat("verify_max_abs_deviation", int(dev.max()), "max")
        stat("verify_outside_tolerance", outside, "sum")
        if outside and note is not None:
            note(
                f"{outside} of {n} re-tokenized long prompts fall outside the tolerance window "
                f"(largest count deviation {int(dev.max())} tokens): this tokenizer merges across document "
                "boundaries in a way the cached counts miss"
            )


SYNTH_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("short_prompt", pa.string()),
        ("long_prompt", pa.string()),
        ("short_tokens", pa.int32()),
        ("long_tokens", pa.int32()),
        ("target_len", pa.int32()),
        ("gold_positions", pa.list_(pa.int32())),  # 0-based; the prompt numbers documents from 1
        ("n_docs", pa.int32()),
        ("n_gold", pa.int32()),
        ("rho", pa.float64()),
        ("dataset", pa.string()),
    ]
)


def _random_order(rng: np.random.Generator, n: int) -> Iterator[int]:
    """A random permutation of range(n), lazily: a 400K-paragraph pool is not shuffled per question."""
    if n <= 65536:
        yield from rng.permutation(n).tolist()
        return
    seen: set[int] = set()
    while len(seen) < n // 2:
        for j in rng.integers(0, n, size=1024).tolist():
            if j not in seen:
                seen.add(j)
                yield j
    yield from (j for j in rng.permutation(n).tolist() if j not in seen)


def _arrange(gold: list[int], distractors: list[int], where: str | float, rng: np.random.Generator):
    """Order the documents. random: gold anywhere; a depth d: gold as one block after round(d * #distractors)."""
    if where == "random":
        docs = gold + distractors
        order = rng.permutation(len(docs)).tolist()
        docs = [docs[o] for o in order]
        gold_set = set(range(len(gold)))
        return docs, [pos for pos, o in enumerate(order) if o in gold_set]
    at = int(round(float(where) * len(distractors)))
    docs = distractors[:at] + gold + distractors[at:]
    return docs, list(range(at, at + len(gold)))


def _as_records(x: Sequence[QARecord] | pa.Table) -> list[QARecord]:
    return table_to_records(x) if isinstance(x, pa.Table) else list(x)


# Forked workers inherit the builder (tokenized pool included) instead of receiving it pickled.
_WORKER: dict[str, Any] = {}


def _plan_chunk(bounds: tuple[int, int]) -> tuple[list[_Plan], dict[str, int], dict[str, list[str]]]:
    b, recs, short_tokens = _WORKER["builder"], _WORKER["records"], _WORKER["short_tokens"]
    drops: dict[str, int] = {}
    examples: dict[str, list[str]] = {}

    def drop(reason: str, n: int = 1, example: str | None = None) -> None:
        drops[reason] = drops.get(reason, 0) + n
        if example is not None:
            examples.setdefault(reason, []).append(example)

    plans = []
    for i in range(*bounds):
        plans.extend(b.plan(recs[i], i, int(short_tokens[i]), drop))
    return plans, drops, examples


def _parallel_plan(builder: ContextBuilder, usable, short_tokens, n_proc: int, drop) -> list[_Plan]:
    import multiprocessing as mp

    builder.idx_cum(4096)  # grow the index table before forking so workers do not each redo it
    _WORKER.update(builder=builder, records=usable, short_tokens=short_tokens)
    step = max(50, len(usable) // (n_proc * 8))
    chunks = [(s, min(s + step, len(usable))) for s in range(0, len(usable), step)]
    plans: list[_Plan] = []
    try:
        with mp.get_context("fork").Pool(n_proc) as pool:
            for p, drops, examples in pool.imap(_plan_chunk, chunks):
                plans.extend(p)
                for reason, c in drops.items():
                    ex = examples.get(reason, [])
                    if drop is not None:
                        for e in ex:
                            drop(reason, example=e)
                        if c > len(ex):
                            drop(reason, n=c - len(ex))
    finally:
        _WORKER.clear()
    return plans


def build_contexts(
    records: Sequence[QARecord] | pa.Table,
    tokenizer: Any,
    config: SynthConfig,
    seed: int = 0,
    drop: Callable[..., None] | None = None,
    pool: Sequence[QARecord] | pa.Table | None = None,
    stat: Callable[..., None] | None = None,
    note: Callable[[str], None] | None = None,
    chat: ChatFormat | None = None,
) -> pa.Table:
    """One row per (question, target length) for any records (load-table rows or QARecords).
    Distractors come from `pool` (default: the records themselves). Pure apart from the callbacks;
    eval reuses it with e.g. SynthConfig(target_len=[16384], gold_position=0.5). Token counts are those of
    `chat` (default: the tokenizer's template, no system message)."""
    recs = _as_records(records)
    builder = ContextBuilder(tokenizer, config, seed=seed, pool=recs if pool is None else pool, chat=chat)
    return builder.build(recs, drop=drop, stat=stat, note=note)


def distractor_pool(record: QARecord, builder: ContextBuilder, limit: int | None = None) -> list[tuple[str, str]]:
    """The distractor candidates of one question in the order synth tries them, as (title, text):
    own non-supporting paragraphs first (short_docs=supporting), then the pool; no gold title, no
    paragraph containing an answer, no duplicates."""
    builder._register(record.paragraphs)
    gold_ids = [builder._pid[(p.title, p.text)] for p in builder._gold(record)]
    own = [builder._pid[(p.title, p.text)] for p in record.paragraphs if not p.is_supporting]
    stream = builder._candidates(record, gold_ids, own if builder.config.short_docs == "supporting" else [])
    out = []
    for pid in stream:
        out.append((builder.titles[pid], builder.texts[pid]))
        if limit is not None and len(out) >= limit:
            break
    return out
