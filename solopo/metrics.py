"""Answer extraction, normalization and sub-EM, shared by the select and eval stages.

sub-EM: lowercase, strip accents, punctuation and articles (a/an/the), collapse whitespace; then

- match="word" (default): a normalized gold answer or alias counts when its token sequence occurs as whole
  tokens in the normalized prediction. "4 albums" matches gold "4", "No, he did not" matches "no", but
  "Eastern" does not match alias "N", "I do not know" not "no", "Russia" not "US".
  On top of the token match the word rule judges what the answer says, not only which words it contains:
  - yes/no questions (every gold is "yes" or "no"): only the answer's leading yes/no counts ("No, he did not"
    matches "no"; "Both are American, so yes" does not match "yes": the final answer must lead with it);
  - an abstention ("No information is given in the documents.", "Not mentioned", "Unknown", "I do not know")
    matches nothing, in particular not the gold "no";
  - negated matches are rejected: the gold after "not"/"never"/"isn't"... in the same clause, unless a
    "but"/"rather"/"instead" comes between ("not Paris", "not in Paris", "not G. Stanley Hall" for alias "Stanley
    Hall"; but "Paris, not London" matches "Paris" and "not Lyon but Paris" matches "Paris");
  - hedges are rejected: an "or" outside the gold's own words ("Paris or Lyon", "either X or Y", "X or
    something else") names alternatives instead of answering;
  - numbers: "1,000" == "1000" (thousands separators), but a decimal point is kept ("16.801" != "16,801");
    number words are digits ("five" == "5", "twenty-one" == "21"); dates are read month-first
    ("7 February 2018" == "February 7, 2018" == "7th of Feb 2018").
- match="substring": the SoLoPO paper's raw rule, `normalize(gold) in normalize(prediction)`, kept byte for byte
  for exact reproduction (none of the judgments above). MuSiQue's short aliases (N, no, IT, US, 4) then match
  inside unrelated words, and "No information is given" matches gold "no".

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


_MONTHS = {
    m[:3]: m for m in ("january february march april may june july august september october november december").split()
}
_MONTH_RE = (
    r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
# "7 February 2018", "7th of Feb. 2018" -> "February 7 2018"; "February 7th, 2018" -> "February 7 2018".
_DAY_MONTH = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH_RE + r"\b", re.IGNORECASE)
_MONTH_DAY = re.compile(r"\b" + _MONTH_RE + r"\s+(\d{1,2})(?:st|nd|rd|th)?\b,?", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_DECIMAL_MARK = "point"  # survives normalize_answer's punctuation removal: "16.801" -> "16point801"
# Clause boundaries end a negation's scope: commas (not thousands separators: removed before), semicolons,
# colons, brackets. Not periods: initials and abbreviations ("G. Stanley Hall", "U.S. Navy") are in answers.
_CLAUSE = re.compile(r"[,;:!?()\[\]]")
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_UNITS)} | {w: str(20 + 10 * i) for i, w in enumerate(_TENS)}
_NUMBER_WORDS |= {t + u: str(20 + 10 * i + j) for i, t in enumerate(_TENS) for j, u in enumerate(_UNITS[1:10], 1)}
_NEGATIONS = frozenset(
    "not never neither nor cannot cant isnt wasnt arent werent doesnt didnt dont hasnt havent hadnt wont t".split()
)
# A negation denies what follows it in its clause until one of these ("not Lyon but Paris").
_SCOPE_ENDS = frozenset("but rather instead however".split())
_YES_NO = frozenset({"yes", "no"})
# Words that may follow a leading yes/no in a real answer ("No, ..." is a clause of its own and always counts).
_YES_NO_NEXT = frozenset(
    "he she it they we i you this that these those both neither either hes its theyre there is are was were did "
    "does do has have had can could will would should not".split()
)
_ABSTENTION = re.compile(
    r"^(?:there (?:is|was|are) )?(?:no (?:information|answer|mention|data|evidence|indication|record|relevant|"
    r"specific|clear|direct|explicit|such)|not (?:mentioned|given|provided|specified|stated|known|enough|"
    r"available|determinable|clear)|unknown|unclear|cannot (?:be )?(?:determined|answered|tell|say)|"
    r"can not (?:be )?(?:determined|answered)|insufficient|i (?:do not|dont|cannot|cant|can not) (?:know|say|tell)|"
    r"none of documents|documents do not|(?:it )?(?:is|was) not (?:mentioned|given|provided|specified|stated|possible))\b"
)


def _canonical_text(s: str) -> str:
    """Dates month-first, thousands separators dropped, decimal points kept (before punctuation removal)."""
    s = _DAY_MONTH.sub(lambda m: f"{_MONTHS[m.group(2)[:3].lower()]} {m.group(1)}", s)
    s = _MONTH_DAY.sub(lambda m: f"{_MONTHS[m.group(1)[:3].lower()]} {m.group(2)}", s)
    s = _THOUSANDS.sub("", s)
    return _DECIMAL.sub(_DECIMAL_MARK, s)


def _number_words(tokens: list[str]) -> list[str]:
    """'five' -> '5', 'twenty one' / 'twentyone' -> '21' (tens followed by a unit join)."""
    out: list[str] = []
    for t in tokens:
        if out and t in _UNITS[1:10] and out[-1] in _TENS:
            out[-1] = _NUMBER_WORDS[out[-1] + t]
        else:
            out.append(t)
    return [_NUMBER_WORDS.get(t, t) for t in out]


def _word_views(s: str) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """The word rule's readings of `s`: (tokens, clause index of each token), with word joiners removed and
    as spaces (one view if equal). Tokens are normalized, canonical (numbers, dates) and per clause."""
    text = _canonical_text(s)
    views = []
    for variant in dict.fromkeys((text, _JOINERS.sub(" ", text))):
        toks: list[str] = []
        clause: list[int] = []
        for i, part in enumerate(_CLAUSE.split(variant)):
            words = _number_words(normalize_answer(part).split())
            toks += words
            clause += [i] * len(words)
        views.append((tuple(toks), tuple(clause)))
    return views


def _is_abstention(tokens: tuple[str, ...]) -> bool:
    return bool(_ABSTENTION.match(" ".join(tokens)))


def _leading_yes_no(tokens: tuple[str, ...], clause: tuple[int, ...]) -> str | None:
    """'yes'/'no' when the answer leads with it as an answer (own clause, or followed by a subject/verb)."""
    if not tokens or tokens[0] not in _YES_NO:
        return None
    if len(tokens) == 1 or clause[1] != clause[0] or tokens[1] in _YES_NO_NEXT:
        return tokens[0]
    return None


def _word_match(tokens: tuple[str, ...], clause: tuple[int, ...], gold: tuple[str, ...]) -> bool:
    """A whole-token occurrence of `gold` that is neither negated nor one of several alternatives."""
    n = len(gold)
    for i in range(len(tokens) - n + 1):
        if tokens[i : i + n] != gold:
            continue
        if "or" in tokens[:i] + tokens[i + n :]:  # a hedge: "Paris or Lyon", "X or something else"
            return False
        if _negated(tokens, clause, i):
            continue  # "not Paris": this occurrence is denied; another one may still count
        return True
    return False


def _negated(tokens: tuple[str, ...], clause: tuple[int, ...], i: int) -> bool:
    """A negation earlier in token i's clause, with no "but"/"rather"/"instead" between them."""
    for j in range(i - 1, -1, -1):
        if clause[j] != clause[i] or tokens[j] in _SCOPE_ENDS:
            return False
        if tokens[j] in _NEGATIONS:
            return True
    return False


def sub_em(prediction: str | None, golds: str | Iterable[str], match: MatchRule = "word") -> bool:
    """True when a normalized gold answer or alias occurs in the normalized prediction.

    match="word": as a whole-token sequence, judged for yes/no, abstention, negation, hedges, numbers and dates
    (default; see the module docstring); match="substring": as a raw substring (the paper's rule, unchanged).
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
    gold_views = {toks for g in golds for toks, _ in _word_views(g) if toks}
    if not gold_views:
        return False
    preds = [(t, c) for t, c in _word_views(prediction) if t]
    if gold_views <= {("yes",), ("no",)}:  # a yes/no question: the leading yes/no decides
        return any(_leading_yes_no(t, c) in {g[0] for g in gold_views} for t, c in preds)
    if any(_is_abstention(t) for t, _ in preds) and not any(_is_abstention(g) for g in gold_views):
        return False
    return any(_word_match(t, c, g) for g in gold_views for t, c in preds)


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
