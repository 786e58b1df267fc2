"""Answer extraction, normalization and sub-EM, shared by the select and eval stages.

sub-EM: lowercase, strip accents, punctuation and articles (a/an/the), collapse whitespace; then

- match="word" (default): a normalized gold answer or alias counts when its token sequence occurs as whole
  tokens in the normalized prediction. "4 albums" matches gold "4", "No, he did not" matches "no", but
  "Eastern" does not match alias "N", "I do not know" not "no", "Russia" not "US".
- match="substring": the SoLoPO paper's raw rule, `normalize(gold) in normalize(prediction)`, kept for exact
  reproduction. MuSiQue's short aliases (N, no, IT, US, 4) then match inside unrelated words.

The prediction is the final answer extracted from the chain of thought, not the whole generation: matching
the whole CoT would reward answers that merely mention the gold entity while reasoning.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Literal, get_args

from solopo.prompts import FINAL_ANSWER_PREFIX

# Markup a model wraps around the final answer ("**Paris**.", "`Paris`", '"Paris"').
_WRAPPERS = "*_`\"'“”‘’ \t"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_WORD = re.compile(r"\w+|[^\w\s]")
# Characters that join words ("Saint-Étienne", "AC/DC", "Hell's"): the word rule tries them both as
# nothing (SQuAD's removal: "saintetienne") and as a space ("saint etienne"), so that "Saint Etienne" and
# "Coca-Cola" vs "Coca Cola" match while dots and commas stay joined ("U.S." == "US", "1,000" == "1000").
_JOINERS = re.compile(r"[-‐‑‒–—/'’‘]")

MatchRule = Literal["word", "substring"]
MATCH_RULES: tuple[str, ...] = get_args(MatchRule)

# Fallbacks, tried in order when the fixed final line is missing. Each captures the rest of its line.
_FALLBACKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # The fixed prefix with small variations ("Final answer is:", "the answer is Paris").
    (
        "answer_is",
        re.compile(r"(?:final\s+)?answer(?:\s+to\s+(?:this|the)\s+question)?\s+is\s*[:：]?\s*(.+)", re.IGNORECASE),
    ),
    # A line starting with "Answer:" / "Final answer:" (optionally bolded).
    ("answer_colon", re.compile(r"^\W*(?:final\s+)?answer\W*[:：]\s*(.+)", re.IGNORECASE | re.MULTILINE)),
    # LaTeX-style \boxed{...}.
    ("boxed", re.compile(r"\\boxed\{([^{}]+)\}")),
)


def _clean(ans: str) -> str | None:
    ans = ans.strip().splitlines()[0] if ans.strip() else ""
    ans = ans.strip(_WRAPPERS)
    # A trailing period ends the sentence, not the answer ("1963." -> "1963"; "U.S." keeps its dots inside).
    ans = re.sub(r"[.。]+$", "", ans).strip(_WRAPPERS)
    return ans or None


def extract_final_answer_with_source(text: str | None) -> tuple[str | None, str]:
    """(answer, how): how is 'prefix' for the fixed final line, a fallback's name, or 'none'."""
    if not text:
        return None, "none"
    low = text.lower()
    idx = low.rfind(FINAL_ANSWER_PREFIX.lower())  # the last one: models sometimes restate it while reasoning
    if idx >= 0:
        ans = _clean(text[idx + len(FINAL_ANSWER_PREFIX) :])
        if ans is not None:
            return ans, "prefix"
    for how, pat in _FALLBACKS:
        matches = list(pat.finditer(text))
        for m in reversed(matches):
            ans = _clean(m.group(1))
            if ans is not None:
                return ans, how
    return None, "none"


def extract_final_answer(text: str | None) -> str | None:
    """The short answer on the final line ('The answer is: X'), with fallbacks; None when there is none."""
    return extract_final_answer_with_source(text)[0]


def normalize_answer(s: str) -> str:
    """Lowercase, drop accents and punctuation, remove articles, collapse whitespace (SQuAD/sub-EM style)."""
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch))  # "Pelé" == "Pele"
    s = s.lower()
    # Remove ASCII and Unicode punctuation (en dashes, curly quotes) the same way.
    s = "".join(ch for ch in s if ch not in _PUNCT and not unicodedata.category(ch).startswith("P"))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _token_views(s: str) -> set[tuple[str, ...]]:
    """The normalized tokens of `s`, with word joiners removed and with them as spaces (one view if equal)."""
    return {tuple(normalize_answer(s).split()), tuple(normalize_answer(_JOINERS.sub(" ", s)).split())}


def _contains_tokens(hay: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def sub_em(prediction: str | None, golds: str | Iterable[str], match: MatchRule = "word") -> bool:
    """True when a normalized gold answer or alias occurs in the normalized prediction.

    match="word": as a whole-token sequence (default); match="substring": as a raw substring (the paper's rule).
    Golds that normalize to the empty string (e.g. "The") are ignored, so they cannot match everything.
    """
    if match not in MATCH_RULES:
        raise ValueError(f"sub_em: unknown match rule {match!r}; use one of {', '.join(MATCH_RULES)}")
    if prediction is None:
        return False
    if isinstance(golds, str):
        golds = [golds]
    golds = [g for g in golds if g is not None]
    if match == "substring":
        pred = normalize_answer(prediction)
        return bool(pred) and any(g and g in pred for g in map(normalize_answer, golds))
    preds = [v for v in _token_views(prediction) if v]
    return any(g and _contains_tokens(p, g) for gold in golds for g in _token_views(gold) for p in preds)


def distinct_ngram_ratio(text: str, n: int = 4) -> tuple[float, int]:
    """(distinct / total word n-grams, total). A looping generation repeats the same n-grams: low ratio."""
    words = _WORD.findall(text.lower())
    total = len(words) - n + 1
    if total <= 0:
        return 1.0, 0
    grams = Counter(tuple(words[i : i + n]) for i in range(total))
    return len(grams) / total, total


def is_repetitive(text: str, n: int = 4, min_distinct: float = 0.5, min_ngrams: int = 16) -> bool:
    """A degenerate sample: at least `min_ngrams` word n-grams of which fewer than `min_distinct` are distinct."""
    ratio, total = distinct_ngram_ratio(text, n)
    return total >= min_ngrams and ratio < min_distinct


__all__ = [
    "MATCH_RULES",
    "MatchRule",
    "distinct_ngram_ratio",
    "extract_final_answer",
    "extract_final_answer_with_source",
    "is_repetitive",
    "normalize_answer",
    "sub_em",
]
