"""Selection by sub-EM on hand-built samples: guards (ties, all correct, all wrong, truncation,
no answer, repetition, length ratio), policies, several pairs per question, long pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from solopo.pipeline.config import RunSettings
from solopo.pipeline.stage import StageContext
from solopo.stages.sample import SAMPLE_SCHEMA
from solopo.stages.select import SELECT_SCHEMA, SelectConfig, SelectStage, choose_pairs, score_samples


def ans(a: str, why: str = "Document 1 says so.") -> str:
    return f"{why}\nThe answer is: {a}"


def words(k: int, tag: str = "w") -> str:
    """k distinct words: a long but not repetitive reasoning."""
    return " ".join(f"{tag}{i}" for i in range(k))


def row(qid: str, samples: list[str], answers=("Paris",), reasons=None, tokens=None, long_samples=()):
    return {
        "id": qid,
        "question": f"q {qid}",
        "answers": list(answers),
        "short_prompt": f"prompt {qid}",
        "dataset": "musique",
        "samples": samples,
        "finish_reasons": list(reasons or ["stop"] * len(samples)),
        "sample_tokens": list(tokens or [len(s.split()) for s in samples]),
        "prompt_tokens": 10,
        "backend": "test",
        "seed": 0,
        "long_samples": list(long_samples),
    }


def run_select(tmp_path: Path, rows: list[dict], seed: int = 0, **cfg) -> tuple[pa.Table, StageContext]:
    ctx = StageContext(stage="select", out_dir=tmp_path, run=RunSettings(seed=seed), config=None)
    stage = SelectStage(SelectConfig(**cfg), ctx)
    out = stage.finalize(stage.run(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)))
    assert out.schema.equals(SELECT_SCHEMA)
    return out, ctx


def test_basic_pair_and_scores(tmp_path):
    out, ctx = run_select(tmp_path, [row("q1", [ans("Paris"), ans("Lyon"), ans("Nice")])])
    (r,) = out.to_pylist()
    assert r["chosen"] == ans("Paris")
    assert r["rejected"] in (ans("Lyon"), ans("Nice"))
    assert (r["chosen_score"], r["rejected_score"]) == (1.0, 0.0)
    assert (r["chosen_answer"], r["n_samples"], r["n_valid"], r["n_correct"]) == ("Paris", 3, 3, 1)
    assert r["policy"] == "random" and r["pair_index"] == 0
    assert ctx.stats["sample_pass_rate"] == round(1 / 3, 4)
    assert ctx.stats["pair_yield"] == 1.0


def test_aliases_and_articles_count_as_correct(tmp_path):
    samples = [ans("the U.S.A."), ans("Canada")]
    out, _ = run_select(tmp_path, [row("q1", samples, answers=["United States", "USA"])])
    (r,) = out.to_pylist()
    assert r["chosen"] == samples[0] and r["rejected"] == samples[1]


def test_all_correct_and_all_wrong_yield_no_pair(tmp_path):
    rows = [
        row("allc", [ans("Paris"), ans("paris!"), ans("The Paris")]),
        row("allw", [ans("Lyon"), ans("Nice")]),
        row("ok", [ans("Paris"), ans("Lyon")]),
    ]
    out, ctx = run_select(tmp_path, rows)
    assert out.column("id").to_pylist() == ["ok"]
    assert ctx.drops == {"all_correct": 1, "all_wrong": 1}
    assert ctx.drop_examples == {"all_correct": ["allc"], "all_wrong": ["allw"]}
    assert ctx.stats["pair_yield"] == round(1 / 3, 4)


def test_ties_identical_texts_never_paired(tmp_path):
    same = ans("Paris")
    # Two identical correct samples and one wrong: the duplicate is dropped, never used as the other side.
    out, ctx = run_select(tmp_path, [row("q1", [same, same + "  ", ans("Lyon")])], pairs_per_question=4)
    rows = out.to_pylist()
    assert len(rows) == 1
    assert rows[0]["chosen"] != rows[0]["rejected"]
    assert ctx.stats["samples_filtered.duplicate_text"] == 1


def test_truncated_samples_are_dropped(tmp_path):
    # The only correct sample hit max_tokens: it may not be chosen, so the question is all wrong.
    r = row("q1", [ans("Paris"), ans("Lyon")], reasons=["length", "stop"])
    out, ctx = run_select(tmp_path, [r], allow_empty=True)
    assert out.num_rows == 0
    assert ctx.drops == {"all_wrong": 1}
    assert ctx.stats["samples_filtered.truncated"] == 1
    # With the guard off the pair exists.
    out, _ = run_select(tmp_path, [r], drop_truncated=False)
    assert out.num_rows == 1


def test_no_answer_and_repetitive_samples_are_dropped(tmp_path):
    loop = "Paris is in France and " * 20 + "\nThe answer is: Paris"
    samples = [loop, "I do not know which document to use.", ans("Paris"), ans("Lyon")]
    out, ctx = run_select(tmp_path, [row("q1", samples)], pairs_per_question=5)
    assert out.num_rows == 1
    assert out.column("chosen").to_pylist() == [ans("Paris")]
    assert ctx.stats["samples_filtered.repetitive"] == 1
    assert ctx.stats["samples_filtered.no_final_answer"] == 1
    assert out.column("n_valid").to_pylist() == [2]


def test_no_valid_samples(tmp_path):
    out, ctx = run_select(tmp_path, [row("q1", ["no idea", "none"])], allow_empty=True)
    assert out.num_rows == 0 and ctx.drops == {"no_valid_samples": 1}


def test_length_ratio_bound(tmp_path):
    samples = [ans("Paris"), ans("Lyon", why=words(60))]
    tokens = [5, 100]
    out, ctx = run_select(tmp_path, [row("q1", samples, tokens=tokens)], max_length_ratio=2.0, allow_empty=True)
    assert out.num_rows == 0 and ctx.drops == {"length_ratio": 1}
    # A rejected within the bound is used instead of the long one.
    samples.append(ans("Nice"))
    tokens.append(8)
    out, _ = run_select(tmp_path, [row("q1", samples, tokens=tokens)], max_length_ratio=2.0)
    assert out.column("rejected").to_pylist() == [ans("Nice")]


def test_policy_shortest(tmp_path):
    samples = [ans("Paris", words(30)), ans("Paris", "short"), ans("Paris", words(10, "m")), ans("Lyon")]
    out, _ = run_select(tmp_path, [row("q1", samples)], policy="shortest")
    assert out.column("chosen").to_pylist() == [ans("Paris", "short")]


def test_policy_length_matched():
    cfg = SelectConfig(policy="length_matched")
    samples = [
        ans("Paris", words(20, "a")),
        ans("Lyon", words(2, "b")),
        ans("Nice", words(19, "c")),
        ans("Metz", words(40)),
    ]
    valid, _ = score_samples(samples, ["stop"] * 4, [len(s.split()) for s in samples], ["Paris"], cfg)
    pairs, reason = choose_pairs(valid, cfg, random.Random(0))
    assert reason is None
    assert pairs[0].rejected.answer == "Nice"  # closest in length to the only correct sample


def test_random_policy_is_seeded(tmp_path):
    samples = [ans("Paris", f"reason {i}") for i in range(6)] + [ans(c) for c in ("Lyon", "Nice", "Metz", "Brest")]
    rows = [row(f"q{i}", samples) for i in range(8)]
    a, _ = run_select(tmp_path, rows, seed=1)
    b, _ = run_select(tmp_path, rows, seed=1)
    c, _ = run_select(tmp_path, rows, seed=2)
    assert a.equals(b)
    assert (
        a.column("chosen").to_pylist() != c.column("chosen").to_pylist()
        or a.column("rejected").to_pylist() != c.column("rejected").to_pylist()
    )
    # random picks differ across questions with identical samples (seeded per question id)
    assert len(set(a.column("chosen").to_pylist())) > 1


def test_several_pairs_per_question(tmp_path):
    samples = [ans("Paris", "one"), ans("Paris", "two"), ans("Lyon"), ans("Nice")]
    out, _ = run_select(tmp_path, [row("q1", samples)], pairs_per_question=3)
    rows = out.to_pylist()
    assert [r["pair_index"] for r in rows] == [0, 1, 2]
    pairs = [(r["chosen"], r["rejected"]) for r in rows]
    assert len(set(pairs)) == 3  # distinct pairs
    # the first two pairs share no sample (diversity first)
    assert pairs[0][0] != pairs[1][0] and pairs[0][1] != pairs[1][1]
    # no more pairs than exist: 2 correct x 2 wrong = 4
    out, _ = run_select(tmp_path, [row("q1", samples)], pairs_per_question=10)
    assert out.num_rows == 4


def test_long_pairs_attached_per_target_len(tmp_path):
    long_ok = {
        "target_len": 4096,
        "samples": [ans("Paris"), ans("Lyon")],
        "finish_reasons": ["stop", "stop"],
        "sample_tokens": [5, 5],
    }
    long_wrong = {
        "target_len": 8192,
        "samples": [ans("Lyon"), ans("Nice")],
        "finish_reasons": ["stop", "stop"],
        "sample_tokens": [5, 5],
    }
    r = row("q1", [ans("Paris"), ans("Metz")], long_samples=[long_ok, long_wrong])
    out, ctx = run_select(tmp_path, [r])
    (o,) = out.to_pylist()
    assert len(o["long_pairs"]) == 1
    lp = o["long_pairs"][0]
    assert (lp["target_len"], lp["chosen"], lp["rejected"]) == (4096, ans("Paris"), ans("Lyon"))
    assert ctx.stats["long_no_pair.8192.all_wrong"] == 1


def test_chosen_never_equals_rejected_randomized(tmp_path):
    rng = random.Random(0)
    pool = [ans("Paris"), ans("paris"), ans("Lyon"), ans("Nice"), "no answer here", ans("Paris", "x")]
    rows = []
    for i in range(200):
        samples = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        reasons = [rng.choice(["stop", "stop", "length"]) for _ in samples]
        rows.append(row(f"q{i}", samples, reasons=reasons))
    out, ctx = run_select(tmp_path, rows, pairs_per_question=3)
    for r in out.to_pylist():
        assert r["chosen"].strip() != r["rejected"].strip()
        assert r["chosen_answer"].lower() == "paris"
        assert r["rejected_answer"] in ("Lyon", "Nice")
    kept = len(set(out.column("id").to_pylist()))
    assert kept + sum(ctx.drops.values()) == 200


def test_config_rejects_unknown_policy():
    with pytest.raises(Exception, match="policy"):
        SelectConfig(policy="best")


def test_match_rule_word_by_default_substring_on_request(tmp_path):
    # MuSiQue-style short alias: "N" for north. The paper's substring rule finds it inside "Eastern".
    samples = [ans("Eastern"), ans("North"), ans("South")]
    out, ctx = run_select(tmp_path / "w", [row("q1", samples, answers=["north", "N"])])
    (r,) = out.to_pylist()
    assert r["chosen"] == samples[1] and r["n_correct"] == 1
    assert ctx.stats["match_rule"] == "word"
    out, ctx = run_select(tmp_path / "s", [row("q1", samples, answers=["north", "N"])], match="substring")
    (r,) = out.to_pylist()
    assert r["n_correct"] == 2 and r["rejected"] == samples[2]  # "Eastern" counted correct: never rejected
    assert ctx.stats["match_rule"] == "substring"
    # The rule decides all_correct vs a pair: "I do not know" contains "no" only as a substring.
    idk = [ans("no"), ans("I do not know")]
    out, ctx = run_select(tmp_path / "s2", [row("q2", idk, answers=["no"])], match="substring", allow_empty=True)
    assert out.num_rows == 0 and ctx.drops == {"all_correct": 1}
    out, _ = run_select(tmp_path / "w2", [row("q2", idk, answers=["no"])])
    assert out.to_pylist()[0]["rejected"] == idk[1]


def test_config_rejects_unknown_match_rule():
    with pytest.raises(Exception, match="match"):
        SelectConfig(match="exact")


def test_zero_pairs_is_an_error_with_drops_and_advice(tmp_path):
    from solopo.stages.select import NoPairsError

    rows = [
        row("w1", [ans("Lyon"), ans("Nice")]),
        row("w2", [ans("Metz"), "no answer at all"]),
        row("t1", [ans("Paris"), ans("Lyon")], reasons=["length", "length"]),
    ]
    with pytest.raises(NoPairsError) as e:
        run_select(tmp_path, rows)
    msg = str(e.value)
    assert "0 pairs from 3 question(s)" in msg
    assert "all_wrong=2, no_valid_samples=1" in msg
    assert "truncated=2" in msg and "no_final_answer=1" in msg
    assert "more samples per question" in msg and "stronger model" in msg and "max_tokens" in msg
    assert "select.allow_empty=true" in msg and "select.match=word" in msg
    details = json.loads((tmp_path / "no_pairs.json").read_text())
    assert details["drops"] == {"all_wrong": 2, "no_valid_samples": 1}
    assert details["drop_examples"]["all_wrong"] == ["w1", "w2"]


def test_zero_pairs_allowed_explicitly(tmp_path):
    out, ctx = run_select(tmp_path, [row("w1", [ans("Lyon"), ans("Nice")])], allow_empty=True)
    assert out.num_rows == 0 and ctx.drops == {"all_wrong": 1}
    assert any("allow_empty" in n for n in ctx.notes)
    assert not (tmp_path / "no_pairs.json").exists()


def test_cli_pair_with_zero_pairs_exits_2(tmp_path, tiny_model_dir):
    """The issue's reproduction: a model that answers nothing right. A random 2-layer model cut at 4 new
    tokens never reaches a final answer; `solopo pair` must fail (rc 2) before export writes anything."""
    from typer.testing import CliRunner

    from solopo.cli import app

    rd = tmp_path / "run"
    args = [
        "pair",
        "--run-dir",
        str(rd),
        "--model",
        str(tiny_model_dir),
        "--backend",
        "transformers",
        "-n",
        "2",
        "--target-len",
        "1536",
        "--set",
        "load.limit=3",
        "--set",
        "sample.max_tokens=4",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "select: 0 pairs from 3 question(s)" in res.output and "no_valid_samples=3" in res.output
    assert not (rd / "select" / "_SUCCESS").exists() and not (rd / "export").exists()
    assert (rd / "select" / "no_pairs.json").exists()

    ok = CliRunner().invoke(app, [*args, "--set", "select.allow_empty=true"])
    assert (rd / "select" / "_SUCCESS").exists(), ok.output
    m = json.loads((rd / "select" / "manifest.json").read_text())
    assert m["rows_out"] == 0 and m["drops"] == {"no_valid_samples": 3}
    assert m["config"]["match"] == "word" and m["stats"]["match_rule"] == "word"
    assert not (rd / "select" / "no_pairs.json").exists()  # stale details of the failed run are gone
    assert "select.match=word" in (rd / "export" / "README.md").read_text()  # the data card names the rule

    # train on the empty result: rc 2, pointing at select's drops (not at an empty list of its own drops).
    sets = ["--set", "sample.backend=transformers", "--set", "sample.n=2", "--set", "synth.target_len=1536"]
    tr = CliRunner().invoke(app, ["train", *args[1:5], *args[11:], *sets, "--set", "select.allow_empty=true"])
    assert tr.exit_code == 2, tr.output
    assert "0 pairs" in tr.output and "select's drops by reason: {'no_valid_samples': 3}" in tr.output


def test_tie_guard_raises_if_a_tie_reaches_the_output(tmp_path, monkeypatch):
    """distilabel's trap: equal scores must never become chosen == rejected. choose_pairs never forms such a
    pair (tests above); the stage re-checks every pair it writes, so a future bug fails loudly."""
    import solopo.stages.select as sel

    def tie(valid, cfg, rng):
        return [sel.Pair(valid[0], valid[0])], None

    monkeypatch.setattr(sel, "choose_pairs", tie)
    with pytest.raises(RuntimeError, match="tie or mislabeled"):
        run_select(tmp_path, [row("q1", [ans("Paris"), ans("Lyon")])])
