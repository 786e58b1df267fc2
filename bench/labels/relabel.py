"""How many labels change between sub-EM's word rule (the default), the word rule of an earlier commit, and the
paper's raw substring rule.

    python3 bench/labels/relabel.py [--run-dir RUN ...] [--before REV]

REV (default 007ef54, the commit before the word rule judged yes/no, abstentions, negation, hedges, numbers and
dates) is read with `git show REV:solopo/metrics.py`; its rule is reported as `word_before`.

1. Stored generations (each --run-dir with sample/ and optionally eval/ outputs): select is re-run on the
   stored samples under both rules (same seed, same config as the run, allow_empty so nothing aborts), and
   every eval prediction is re-scored under both rules. Counted: sample labels, selection outcomes per
   question (a pair, or the drop reason), the chosen/rejected texts, eval labels.
3. Edge probes, no generation: for every question of a shipped dataset, predictions made from its own gold
   answer: the gold itself, an abstention ("No information is given in the documents."), "not <gold>",
   "<gold> or something else", and for numeric / date golds the same value written another way ("5" <-> "five",
   "7 February 2018" <-> "February 7, 2018"). Counted: how many each rule accepts.
2. No generation needed: on every shipped dataset each question is scored against the gold answers of every
   *other* question used as its prediction ("what if the model answered another question's answer"). Pairs
   that share a gold answer are correct under both rules; the rest of what the substring rule accepts are
   false positives. Each question's own gold is also checked to score correct under both rules.

Writes results.json and results.md next to this file (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from solopo.datasets import load_records  # noqa: E402
from solopo.metrics import MATCH_RULES, sub_em  # noqa: E402
from solopo.pipeline.io import read_parquet  # noqa: E402
from solopo.pipeline.runner import load_manifest  # noqa: E402
from solopo.pipeline.stage import StageContext  # noqa: E402
from solopo.stages.select import SelectConfig, SelectStage, score_samples  # noqa: E402

HERE = Path(__file__).resolve().parent
logging.getLogger("solopo").setLevel(logging.ERROR)  # allow_empty notes would repeat per question
SHIPPED = ["musique-sample", "musique-dev-sample", "hotpotqa-sample"]
BEFORE = "007ef54"
RULES: dict[str, Any] = {rule: (lambda p, g, rule=rule: sub_em(p, g, match=rule)) for rule in MATCH_RULES}


def rule_at(rev: str):
    """The word rule of solopo/metrics.py at git revision `rev` (loaded from `git show`, not imported)."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:solopo/metrics.py"], check=True, capture_output=True, text=True
    ).stdout
    mod = types.ModuleType(f"metrics_at_{rev}")
    exec(compile(src, f"{rev}:solopo/metrics.py", "exec"), mod.__dict__)  # noqa: S102 (our own file at a commit)
    return lambda p, g: mod.sub_em(p, g, match="word")


_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_MONTHS = "January February March April May June July August September October November December".split()


def _rewrites(gold: str) -> list[str]:
    """The same number or date written another way, when the gold is one."""
    import re

    g = gold.strip()
    if g.isdigit() and int(g) < len(_WORDS):
        return [_WORDS[int(g)]]
    if g.lower() in _WORDS:
        return [str(_WORDS.index(g.lower()))]
    m = re.fullmatch(r"(\d{1,2}) (" + "|".join(_MONTHS) + r"),? (\d{4})", g)
    if m:
        return [f"{m.group(2)} {m.group(1)}, {m.group(3)}"]
    m = re.fullmatch(r"(" + "|".join(_MONTHS) + r") (\d{1,2}),? (\d{4})", g)
    if m:
        return [f"{m.group(2)} {m.group(1)} {m.group(3)}"]
    return []


def edge_probes(source: str, rules: dict[str, Any], max_examples: int = 4) -> dict[str, Any]:
    """For each question, predictions built from its own gold: how many each rule accepts."""
    recs = load_records(source)
    kinds = {
        "own gold": lambda r: [r.answer],
        "abstention": lambda r: ["No information is given in the documents."],
        "not <gold>": lambda r: [f"not {r.answer}"],
        "<gold> or something else": lambda r: [f"{r.answer} or something else"],
        "number/date written another way": lambda r: _rewrites(r.answer),
    }
    out: dict[str, Any] = {"source": source, "questions": len(recs), "yes_no_questions": 0, "probes": {}}
    out["yes_no_questions"] = sum(r.answer.strip().lower() in ("yes", "no") for r in recs)
    for kind, make in kinds.items():
        counts: Counter = Counter()
        examples = []
        for r in recs:
            for pred in make(r):
                counts["predictions"] += 1
                verdict = {name: bool(rule(pred, r.answers)) for name, rule in rules.items()}
                counts.update(name for name, ok in verdict.items() if ok)
                if "word_before" in verdict and verdict["word_before"] != verdict["word"]:
                    counts["changed_word_before_to_word"] += 1
                    if len(examples) < max_examples:
                        examples.append({"prediction": pred, "golds": r.answers[:4], **verdict})
        out["probes"][kind] = {**counts, "examples": examples}
    return out


def _select_one(row: dict[str, Any], schema, cfg: SelectConfig, seed: int, out_dir: Path) -> tuple[list[dict], str]:
    """select on one question (its random picks are seeded per question id, as in a whole run): (pairs, outcome)."""
    import pyarrow as pa

    from solopo.pipeline.config import RunSettings

    ctx = StageContext(stage="select", out_dir=out_dir, run=RunSettings(seed=seed), config=None)
    stage = SelectStage(cfg, ctx)
    pairs = stage.finalize(stage.run(pa.Table.from_pylist([row], schema=schema))).to_pylist()
    return pairs, "pair" if pairs else next(iter(ctx.drops))


def stored_generations(run_dir: Path, scratch: Path) -> dict[str, Any]:
    """Sample labels and selections (when the run has sample/ output) and eval labels (when it has eval/)."""
    res: dict[str, Any] = {"run_dir": run_dir.name}
    if (run_dir / "sample" / "data.parquet").exists():
        res.update(stored_samples(run_dir, scratch))
    ev = run_dir / "eval" / "data.parquet"
    if ev.exists():
        res.update(stored_eval(ev))
        res.setdefault("model", ", ".join(sorted({p["model"] for p in read_parquet(ev).to_pylist()})))
    return res


def stored_samples(run_dir: Path, scratch: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    samples = read_parquet(run_dir / "sample" / "data.parquet")
    m = load_manifest(run_dir, "sample")
    seed = int(m["run"]["seed"])
    base = (
        SelectConfig(**{**load_manifest(run_dir, "select")["config"], "allow_empty": True})
        if (run_dir / "select" / "manifest.json").exists()
        else SelectConfig(allow_empty=True)
    )
    res["model"] = m["run"].get("model") or "embedded SmolLM2-135M-Instruct"
    res["questions"] = samples.num_rows

    # Sample labels: every valid sample, scored under both rules.
    rows = samples.to_pylist()
    n_valid, correct, changed, examples = 0, Counter(), 0, []
    for r in rows:
        valid, _ = score_samples(r["samples"], r["finish_reasons"], r["sample_tokens"], r["answers"], base)
        for s in valid:
            n_valid += 1
            verdict = {name: bool(rule(s.answer, r["answers"])) for name, rule in RULES.items()}
            correct.update(rule for rule, v in verdict.items() if v)
            if verdict["word"] != verdict["substring"]:
                changed += 1
                if len(examples) < 10:
                    examples.append({"id": r["id"], "answer": s.answer, "golds": r["answers"], **verdict})
    res["sample_labels"] = {
        "valid_samples": n_valid,
        "correct": dict(correct),
        "changed": changed,
        "examples": examples,
    }

    # Selections, question by question: the outcome (a pair or the drop reason) and the pairs themselves.
    per_rule: dict[str, dict[str, Any]] = {}
    for rule in MATCH_RULES:
        cfg = base.model_copy(update={"match": rule})
        pairs, outcomes = [], {}
        for r in rows:
            got, outcomes[r["id"]] = _select_one(r, samples.schema, cfg, seed, scratch / rule)
            pairs += got
        per_rule[rule] = {"pairs": pairs, "outcomes": outcomes}
    w, s = per_rule["word"], per_rule["substring"]
    wp = {(p["id"], p["pair_index"]): (p["chosen"], p["rejected"]) for p in w["pairs"]}
    sp = {(p["id"], p["pair_index"]): (p["chosen"], p["rejected"]) for p in s["pairs"]}
    res["selection"] = {
        "pairs": {rule: len(per_rule[rule]["pairs"]) for rule in MATCH_RULES},
        "outcomes": {rule: dict(Counter(per_rule[rule]["outcomes"].values())) for rule in MATCH_RULES},
        "questions_with_changed_outcome": sum(w["outcomes"][q] != s["outcomes"][q] for q in w["outcomes"]),
        "pairs_with_changed_chosen_or_rejected": sum(wp.get(k) != sp.get(k) for k in set(wp) | set(sp)),
        "select_config": {k: v for k, v in base.model_dump().items() if k != "match"},
    }

    return res


def stored_eval(ev: Path, max_examples: int = 12) -> dict[str, Any]:
    """Every eval prediction re-scored under each rule; the ones the new word rule relabels, as examples."""
    preds = read_parquet(ev).to_pylist()
    lab = {
        name: [p["prediction"] is not None and bool(rule(p["prediction"], p["answers"])) for p in preds]
        for name, rule in RULES.items()
    }
    out: dict[str, Any] = {
        "predictions": len(preds),
        "correct": {rule: sum(v) for rule, v in lab.items()},
        "changed": sum(a != b for a, b in zip(lab["word"], lab["substring"], strict=True)),
    }
    if "word_before" in lab:
        changed = [i for i, (a, b) in enumerate(zip(lab["word_before"], lab["word"], strict=True)) if a != b]
        out["changed_word_before_to_word"] = len(changed)
        out["changed_examples"] = [
            {"prediction": preds[i]["prediction"], "golds": list(preds[i]["answers"])[:4],
             "word_before": lab["word_before"][i], "word": lab["word"][i]}
            for i in changed[:max_examples]
        ]  # fmt: skip
    return {"eval_labels": out}


def cross_answers(source: str, seed: int = 0, max_examples: int = 8) -> dict[str, Any]:
    recs = load_records(source)
    counts = Counter()
    examples: list[dict[str, Any]] = []
    own_ok = {rule: sum(sub_em(r.answer, r.answers, match=rule) for r in recs) for rule in MATCH_RULES}
    for q in recs:
        for other in recs:
            if other.id == q.id:
                continue
            v = {name: bool(rule(other.answer, q.answers)) for name, rule in RULES.items()}
            counts["pairs"] += 1
            for rule, ok in v.items():
                counts[rule] += ok
            if "word_before" in v and v["word_before"] != v["word"]:
                counts["changed_word_before_to_word"] += 1
            if v["substring"] and not v["word"]:
                counts["substring_only"] += 1
                examples.append({"prediction": other.answer, "golds": q.answers})
            if v["word"] and not v["substring"]:
                counts["word_only"] += 1
    random.Random(seed).shuffle(examples)
    questions_hit = sum(
        any(
            sub_em(o.answer, q.answers, match="substring") and not sub_em(o.answer, q.answers)
            for o in recs
            if o.id != q.id
        )
        for q in recs
    )
    return {
        "source": source,
        "questions": len(recs),
        "own_gold_correct": own_ok,
        **counts,
        "questions_with_a_substring_only_false_positive": questions_hit,
        "examples": examples[:max_examples],
    }


def to_markdown(res: dict[str, Any]) -> str:
    before = res.get("word_before", "?")
    lines = [
        "# sub-EM: word rule (default) vs the paper's substring rule, and vs the word rule at " + before,
        "",
        "Printed by `python3 bench/labels/relabel.py` (no generation: shipped datasets only; stored runs with "
        "`--run-dir`). `word before` = the word rule at git " + before + ", before it judged yes/no answers, "
        "abstentions, negation, hedges, numbers and dates.",
        "",
    ]
    for g in res["stored"]:
        sl, se = g.get("sample_labels"), g.get("selection")
        lines += [
            f"## Stored generations: {g['run_dir']} ({g['model']}, {g.get('questions', '-')} sampled questions)",
            "",
            "| what | word | substring | changed |",
            "|---|---:|---:|---:|",
        ]
        if sl and se:
            lines += [
                f"| valid samples labeled correct (of {sl['valid_samples']}) | {sl['correct'].get('word', 0)} | "
                f"{sl['correct'].get('substring', 0)} | {sl['changed']} |",
                f"| pairs selected | {se['pairs']['word']} | {se['pairs']['substring']} | "
                f"{se['pairs_with_changed_chosen_or_rejected']} pairs with another chosen or rejected |",
                f"| question outcomes (pair / drop reason) | {se['outcomes']['word']} | "
                f"{se['outcomes']['substring']} | {se['questions_with_changed_outcome']} questions |",
            ]
        if "eval_labels" in g:
            el = g["eval_labels"]
            lines.append(
                f"| eval predictions correct (of {el['predictions']}) | {el['correct']['word']} | "
                f"{el['correct']['substring']} | {el['changed']} (word before: {el['correct'].get('word_before')}; "
                f"{el.get('changed_word_before_to_word')} changed by the new word rule) |"
            )
        else:
            lines.append("| eval predictions | - | - | no eval outputs in this run |")
        for e in g.get("eval_labels", {}).get("changed_examples", []):
            lines.append(
                f"- eval label changed by the new word rule: `{e['prediction']}` vs {e['golds']} "
                f"(before {e['word_before']}, now {e['word']})"
            )
        if sl and sl["examples"]:
            lines += [
                "",
                "Samples whose label changes: "
                + "; ".join(
                    f"`{e['answer']}` vs {e['golds'][:3]} (substring {e['substring']}, word {e['word']})"
                    for e in sl["examples"]
                ),
            ]
        lines.append("")
    lines += [
        "## Another question's gold answer as the prediction (no generation)",
        "",
        "Every ordered pair of distinct questions in a shipped dataset: question B's gold answer scored against "
        "question A's gold answer and aliases. A rule's accepted count includes pairs that share an answer "
        "(legitimately correct under both rules); `substring only` are the false positives the word rule removes.",
        "",
        "| dataset | questions | pairs | accepted: word | accepted: word before | changed: before -> word | "
        "accepted: substring | substring only | word only | questions with a substring-only false positive | "
        "own gold correct (word / substring) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in res["cross_answers"]:
        lines.append(
            f"| {c['source']} | {c['questions']} | {c['pairs']} | {c.get('word', 0)} | {c.get('word_before', 0)} | "
            f"{c.get('changed_word_before_to_word', 0)} | {c.get('substring', 0)} | "
            f"{c.get('substring_only', 0)} | {c.get('word_only', 0)} | "
            f"{c['questions_with_a_substring_only_false_positive']} | "
            f"{c['own_gold_correct']['word']} / {c['own_gold_correct']['substring']} |"
        )
    lines += ["", "Examples of substring-only acceptances (prediction -> golds):", ""]
    for c in res["cross_answers"]:
        for e in c["examples"][:4]:
            lines.append(f"- {c['source']}: `{e['prediction']}` -> {e['golds'][:4]}")
    lines += [
        "",
        "## Edge probes: predictions made from each question's own gold (no generation)",
        "",
        "Accepted = scored correct. An abstention, a negated gold and a hedged gold should be accepted by no "
        "rule; the gold and the same number/date written another way by every rule.",
        "",
        "| dataset | probe | predictions | accepted: word | accepted: word before | changed: before -> word | "
        "accepted: substring |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in res.get("edge_probes", []):
        for kind, c in e["probes"].items():
            lines.append(
                f"| {e['source']} | {kind} | {c.get('predictions', 0)} | {c.get('word', 0)} | "
                f"{c.get('word_before', 0)} | {c.get('changed_word_before_to_word', 0)} | {c.get('substring', 0)} |"
            )
    lines += ["", "Yes/no questions: " + ", ".join(f"{e['source']} {e['yes_no_questions']}" for e in
                                                  res.get("edge_probes", [])) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, action="append", default=[], help="a run with sample/ (and eval/) outputs")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--before", default=BEFORE, help="git revision whose word rule is reported as word_before")
    args = ap.parse_args()
    import tempfile

    RULES["word_before"] = rule_at(args.before)
    scratch = Path(tempfile.mkdtemp(prefix="relabel-"))
    res = {
        "rules": list(RULES),
        "word_before": args.before,
        "stored": [stored_generations(d, scratch) for d in args.run_dir],
        "cross_answers": [cross_answers(s) for s in SHIPPED],
        "edge_probes": [edge_probes(s, RULES) for s in SHIPPED],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "results.md").write_text(to_markdown(res))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
