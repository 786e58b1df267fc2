"""Stage `select`: chosen/rejected pairs by sub-EM.

Per question: drop degenerate samples (truncated at max_tokens, no final answer, repetitive), score the
rest by sub-EM of the extracted final answer against the answer and its aliases, then pair a correct
sample (chosen) with an incorrect one (rejected) under an explicit policy:

- random:         a random correct and a random incorrect sample (seeded by run seed and question id)
- shortest:       the shortest correct sample (in tokens), a random incorrect one
- length_matched: a random correct sample and the incorrect one closest to it in length (less length bias)

Correctness is sub-EM under `match`: "word" (default; the gold's tokens occur as whole tokens in the
answer) or "substring" (the paper's raw rule; short aliases like "N" or "US" then match inside words).

Questions whose valid samples are all correct or all wrong yield no pair (drops: all_correct, all_wrong,
no_valid_samples). Identical texts are never paired. Zero pairs in total is an error (NoPairsError, with
the drops by reason and what to try) unless `allow_empty: true`. With `pairs_per_question: k`, up to k
distinct pairs are taken, preferring pairs that reuse neither side.

With long samples (sample.on=both) the same rules pick one long pair per target_len and pair index,
stored in `long_pairs` (a question with no short pair is dropped whatever its long samples).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from solopo.metrics import MatchRule, extract_final_answer, is_repetitive, sub_em
from solopo.pipeline.config import StageConfig
from solopo.pipeline.errors import SolopoError
from solopo.pipeline.io import write_json
from solopo.pipeline.stage import Stage

from . import register
from .sample import question_seed

_LONG_PAIRS = pa.list_(
    pa.struct(
        [
            pa.field("target_len", pa.int64()),
            pa.field("chosen", pa.string()),
            pa.field("rejected", pa.string()),
            pa.field("chosen_answer", pa.string()),
            pa.field("rejected_answer", pa.string()),
            pa.field("n_valid", pa.int32()),
            pa.field("n_correct", pa.int32()),
        ]
    )
)

SELECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("pair_index", pa.int32()),
        pa.field("answers", pa.list_(pa.string())),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("chosen_score", pa.float32()),
        pa.field("rejected_score", pa.float32()),
        pa.field("chosen_answer", pa.string()),
        pa.field("rejected_answer", pa.string()),
        pa.field("chosen_sample_tokens", pa.int32()),
        pa.field("rejected_sample_tokens", pa.int32()),
        pa.field("n_samples", pa.int32()),
        pa.field("n_valid", pa.int32()),
        pa.field("n_correct", pa.int32()),
        pa.field("policy", pa.string()),
        pa.field("long_pairs", _LONG_PAIRS),
    ]
)


class SelectConfig(StageConfig):
    policy: Literal["random", "shortest", "length_matched"] = Field(
        default="random",
        description="chosen/rejected: random; shortest correct; length_matched (rejected closest in length)",
    )
    match: MatchRule = Field(
        default="word", description="sub-EM rule: word (whole tokens) or substring (the paper's raw containment)"
    )
    pairs_per_question: int = Field(default=1, ge=1, description="pairs kept per question (distinct samples)")
    drop_truncated: bool = Field(default=True, description="drop samples cut at max_tokens")
    drop_no_answer: bool = Field(default=True, description="drop samples without a final answer line")
    drop_repetitive: bool = Field(default=True, description="drop degenerate repetitive samples")
    repetition_ngram: int = Field(default=4, ge=1, description="n of the n-grams the repetition test counts")
    repetition_min_distinct: float = Field(
        default=0.5, ge=0.0, le=1.0, description="repetitive when distinct/total n-grams is below this"
    )
    max_length_ratio: float | None = Field(
        default=None, ge=1.0, description="bound on longer/shorter (tokens) of chosen vs rejected; None = off"
    )
    seed: int | None = Field(default=None, description="None = run.seed")
    allow_empty: bool = Field(default=False, description="accept 0 pairs instead of failing (nothing to train on)")


class NoPairsError(SolopoError):
    """select kept no pair at all: training would have nothing to learn from."""


@dataclass(frozen=True)
class Scored:
    index: int
    text: str
    answer: str | None
    tokens: int
    correct: bool


@dataclass(frozen=True)
class Pair:
    chosen: Scored
    rejected: Scored


def score_samples(
    samples: list[str],
    finish_reasons: list[str],
    tokens: list[int],
    answers: list[str],
    cfg: SelectConfig,
) -> tuple[list[Scored], dict[str, int]]:
    """Valid samples with their sub-EM verdicts, and counts of samples filtered out by reason."""
    valid: list[Scored] = []
    filtered: dict[str, int] = {}
    seen: set[str] = set()
    for i, (text, reason, ntok) in enumerate(zip(samples, finish_reasons, tokens, strict=True)):
        why = None
        answer = extract_final_answer(text)
        if cfg.drop_truncated and reason == "length":
            why = "truncated"
        elif cfg.drop_no_answer and answer is None:
            why = "no_final_answer"
        elif cfg.drop_repetitive and is_repetitive(text, cfg.repetition_ngram, cfg.repetition_min_distinct):
            why = "repetitive"
        elif text.strip() in seen:
            why = "duplicate_text"  # identical samples add no information and must never face each other
        if why:
            filtered[why] = filtered.get(why, 0) + 1
            continue
        seen.add(text.strip())
        valid.append(Scored(i, text, answer, int(ntok), sub_em(answer, answers, match=cfg.match)))
    return valid, filtered


def _ratio_ok(p: Pair, bound: float | None) -> bool:
    if bound is None:
        return True
    a, b = max(p.chosen.tokens, 1), max(p.rejected.tokens, 1)
    return max(a, b) / min(a, b) <= bound


def choose_pairs(valid: list[Scored], cfg: SelectConfig, rng: random.Random) -> tuple[list[Pair], str | None]:
    """Up to cfg.pairs_per_question pairs, or ([], reason) when the question yields none."""
    if not valid:
        return [], "no_valid_samples"
    correct = [s for s in valid if s.correct]
    wrong = [s for s in valid if not s.correct]
    if not wrong:
        return [], "all_correct"
    if not correct:
        return [], "all_wrong"
    cands = [Pair(c, r) for c in correct for r in wrong if c.text.strip() != r.text.strip()]
    # Random tie-break keys first, then the policy's order (stable sort keeps the shuffle within ties).
    rng.shuffle(cands)
    if cfg.policy == "shortest":
        cands.sort(key=lambda p: p.chosen.tokens)
    elif cfg.policy == "length_matched":
        first = cands[0].chosen if cands else None
        # One random chosen, rejected closest to it; other chosen samples only for extra pairs.
        cands.sort(key=lambda p: (p.chosen is not first, abs(p.chosen.tokens - p.rejected.tokens)))
    cands = [p for p in cands if _ratio_ok(p, cfg.max_length_ratio)]
    if not cands:
        return [], "length_ratio"
    k = cfg.pairs_per_question
    picked: list[Pair] = []
    used_c: set[int] = set()
    used_r: set[int] = set()
    # First pass: pairs sharing no sample with earlier pairs; second pass: any remaining distinct pair.
    for p in cands:
        if len(picked) == k:
            break
        if p.chosen.index not in used_c and p.rejected.index not in used_r:
            picked.append(p)
            used_c.add(p.chosen.index)
            used_r.add(p.rejected.index)
    for p in cands:
        if len(picked) == k:
            break
        if p not in picked:
            picked.append(p)
    return picked, None


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"


@register
class SelectStage(Stage):
    name = "select"
    Config = SelectConfig
    after = "sample"
    version = "2"  # 2: word-bounded sub-EM by default
    reads = ("id", "answers", "samples", "finish_reasons", "sample_tokens", "long_samples")
    writes = tuple(SELECT_SCHEMA.names)

    def run(self, data: pa.Table) -> pa.Table:
        cfg = self.config
        seed = self.ctx.run.seed if cfg.seed is None else cfg.seed
        out: list[dict[str, Any]] = []
        totals = {"samples": 0, "valid": 0, "correct": 0}
        pass_rates: list[float] = []
        for row in data.to_pylist():
            qid = row["id"]
            answers = list(row["answers"])
            valid, filtered = score_samples(row["samples"], row["finish_reasons"], row["sample_tokens"], answers, cfg)
            for why, k in filtered.items():
                self.ctx.stat(f"samples_filtered.{why}", k, "sum")
            n_correct = sum(s.correct for s in valid)
            totals["samples"] += len(row["samples"])
            totals["valid"] += len(valid)
            totals["correct"] += n_correct
            if valid:
                pass_rates.append(n_correct / len(valid))
            rng = random.Random(question_seed(seed, qid))
            pairs, reason = choose_pairs(valid, cfg, rng)
            if reason:
                self.ctx.drop(reason, example=qid)
                continue
            long_pairs = self._long_pairs(row.get("long_samples") or [], answers, len(pairs), rng)
            for i, p in enumerate(pairs):
                if p.chosen.text.strip() == p.rejected.text.strip() or not p.chosen.correct or p.rejected.correct:
                    # The guard the method relies on (a tie must never become a pair); not an assert: -O strips those.
                    raise RuntimeError(f"select: question {qid!r} pair {i} is a tie or mislabeled (a bug)")
                out.append(
                    {
                        "id": qid,
                        "pair_index": i,
                        "answers": answers,
                        "chosen": p.chosen.text,
                        "rejected": p.rejected.text,
                        "chosen_score": 1.0,
                        "rejected_score": 0.0,
                        "chosen_answer": p.chosen.answer,
                        "rejected_answer": p.rejected.answer,
                        "chosen_sample_tokens": p.chosen.tokens,
                        "rejected_sample_tokens": p.rejected.tokens,
                        "n_samples": len(row["samples"]),
                        "n_valid": len(valid),
                        "n_correct": n_correct,
                        "policy": cfg.policy,
                        "long_pairs": [lp[i] for lp in long_pairs if i < len(lp)],
                    }
                )
        self.ctx.stat("questions", data.num_rows, "sum")
        self.ctx.stat("questions_with_pair", len({r["id"] for r in out}), "sum")
        self.ctx.stat("pairs", len(out), "sum")
        self.ctx.stat("samples", totals["samples"], "sum")
        self.ctx.stat("samples_valid", totals["valid"], "sum")
        self.ctx.stat("samples_correct", totals["correct"], "sum")
        self.ctx.stat("sum_question_pass_rate", round(sum(pass_rates), 6), "sum")
        self.ctx.stat("questions_with_valid_samples", len(pass_rates), "sum")
        return pa.Table.from_pylist(out, schema=SELECT_SCHEMA)

    def _long_pairs(
        self, long_samples: list[dict[str, Any]], answers: list[str], k: int, rng: random.Random
    ) -> list[list[dict[str, Any]]]:
        """Per target_len, up to k pairs from the samples drawn on that long prompt."""
        result = []
        for entry in long_samples:
            tl = entry["target_len"]
            valid, filtered = score_samples(
                entry["samples"], entry["finish_reasons"], entry["sample_tokens"], answers, self.config
            )
            for why, n in filtered.items():
                self.ctx.stat(f"long_samples_filtered.{why}", n, "sum")
            self.ctx.stat(f"long_samples.{tl}", len(entry["samples"]), "sum")
            self.ctx.stat(f"long_samples_correct.{tl}", sum(s.correct for s in valid), "sum")
            pairs, reason = choose_pairs(valid, self.config, rng)
            if reason:
                # Not a dropped row: the short pair stands; the long one is missing for this length.
                self.ctx.stat(f"long_no_pair.{tl}.{reason}", 1, "sum")
                continue
            result.append(
                [
                    {
                        "target_len": tl,
                        "chosen": p.chosen.text,
                        "rejected": p.rejected.text,
                        "chosen_answer": p.chosen.answer,
                        "rejected_answer": p.rejected.answer,
                        "n_valid": len(valid),
                        "n_correct": sum(s.correct for s in valid),
                    }
                    for p in pairs[:k]
                ]
            )
        return result

    def finalize(self, table: pa.Table) -> pa.Table:
        s = self.ctx.stats
        if s.get("samples_valid"):
            self.ctx.stat("sample_pass_rate", round(s["samples_correct"] / s["samples_valid"], 4))
        if s.get("questions_with_valid_samples"):
            self.ctx.stat(
                "mean_question_pass_rate", round(s["sum_question_pass_rate"] / s["questions_with_valid_samples"], 4)
            )
        if s.get("questions"):
            self.ctx.stat("pair_yield", round(s.get("questions_with_pair", 0) / s["questions"], 4))
        self.ctx.stat("match_rule", self.config.match)
        (self.ctx.out_dir / "no_pairs.json").unlink(missing_ok=True)  # details of an earlier failed run
        if table.num_rows == 0:
            if not self.config.allow_empty:
                raise self._no_pairs()
            self.ctx.note("0 pairs (allowed by select.allow_empty=true): there is nothing to train on")
        return table

    def _no_pairs(self) -> NoPairsError:
        """The error for 0 pairs: drops by reason, filtered samples, what to try; details kept in no_pairs.json."""
        s, drops = self.ctx.stats, dict(self.ctx.drops)
        filtered = {k.split(".", 1)[1]: v for k, v in s.items() if k.startswith("samples_filtered.")}
        path = self.ctx.out_dir / "no_pairs.json"
        write_json({"drops": drops, "drop_examples": self.ctx.drop_examples, "stats": s}, path)
        n_samples = getattr(getattr(self.ctx.config, "sample", None), "n", "?")
        tips = []
        if drops.get("all_wrong") or drops.get("no_valid_samples"):
            tips.append(f"more samples per question (sample.n / --num-samples, now {n_samples})")
            tips.append("a stronger model (--model)")
        if filtered.get("truncated"):
            tips.append("a larger sample.max_tokens (samples were cut before their final answer)")
        if filtered.get("no_final_answer"):
            tips.append("a model that ends with 'The answer is: ...' (samples had no final answer)")
        if drops.get("all_correct"):
            tips.append("harder questions or longer contexts (every sample was right)")
        tips.append(f"check the gold answers and aliases in the data (matching rule select.match={self.config.match})")
        return NoPairsError(
            f"select: 0 pairs from {s.get('questions', 0)} question(s), nothing to train on. "
            f"Questions dropped by reason: {_counts(drops)}; samples filtered: {_counts(filtered)}. "
            f"Try: {'; '.join(tips)}. Details: {path}. "
            "To keep an empty result anyway: --set select.allow_empty=true"
        )
