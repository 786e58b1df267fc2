"""synth: config parsing, exact lengths within the tolerance, no-leak distractors, gold placement, errors."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from solopo.datasets import Paragraph, QARecord, contains_answer, load_records, match_key
from solopo.pipeline.errors import DataError
from solopo.stages.contexts import ContextBuilder, SynthConfig, TokenCounter, build_contexts, distractor_pool

# A template that is easy to parse back, to check what went into each prompt.
TEST_DOC = "<doc {i}>{title}||{text}</doc>"
DOC_RE = re.compile(r"<doc (\d+)>(.*?)\|\|(.*?)</doc>", re.S)


@pytest.fixture(scope="module")
def records():
    return load_records("musique-sample")


@pytest.fixture(scope="module")
def built(records, tokenizer):
    cfg = SynthConfig(target_len="1k,2k", doc_template=TEST_DOC, verify_sample=0)
    stats: dict = {}
    table = build_contexts(
        records[:40], tokenizer, cfg, seed=3, pool=records, stat=lambda k, v, how="set": stats.update({k: v})
    )
    return cfg, table, stats


def test_config_parsing():
    assert SynthConfig(target_len="4k,8k").target_len == [4096, 8192]
    assert SynthConfig(target_len=["8k", "4k"]).target_len == [4096, 8192]
    assert SynthConfig(target_len=8192).target_len == [8192]
    assert SynthConfig(gold_position="0.25").gold_position == 0.25
    assert SynthConfig(gold_position="Random").gold_position == "random"
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        SynthConfig(target_len="8q", gold_position=1.5, doc_template="{body}", prompt_template="{question}", colour=1)
    assert e.value.error_count() == 5  # every problem at once


def test_lengths_exact_and_within_tolerance(built, tokenizer):
    cfg, table, _ = built
    assert table.num_rows == 80
    counter = TokenCounter(tokenizer)
    rows = table.to_pylist()
    real_long = counter.count_chat([r["long_prompt"] for r in rows])
    real_short = counter.count_chat([r["short_prompt"] for r in rows])
    for r, rl, rs in zip(rows, real_long, real_short, strict=True):
        assert rl == r["long_tokens"], "cached counts must equal a full tokenization"
        assert rs == r["short_tokens"]
        assert r["target_len"] * (1 - cfg.tolerance) <= r["long_tokens"] <= r["target_len"]
        assert r["rho"] == pytest.approx(r["short_tokens"] / r["long_tokens"])
        assert r["n_docs"] == len(DOC_RE.findall(r["long_prompt"]))


def test_ruler_template_and_own_short_docs_exact(records, tokenizer):
    # RULER's own rendering and the "all own paragraphs" short context, with a tight 0.5% window.
    cfg = SynthConfig(
        target_len=[6000],
        doc_template="Document {i}:\n{title}\n{text}",
        short_docs="own",
        tolerance=0.005,
        verify_sample=10,
    )
    stats: dict = {}
    table = build_contexts(
        records[:10], tokenizer, cfg, pool=records, stat=lambda k, v, how="set": stats.update({k: v})
    )
    assert stats["verify_max_abs_deviation"] == 0 and stats["verify_prompts"] == 10
    assert table.num_rows == 10 and all(5970 <= t <= 6000 for t in table.column("long_tokens").to_pylist())
    assert all(g == 20 for g in table.column("n_gold").to_pylist())


def _docs(prompt: str) -> list[tuple[int, str, str]]:
    return [(int(i), t, x) for i, t, x in DOC_RE.findall(prompt)]


def test_no_leak_no_duplicates_gold_recorded(built, records):
    _, table, _ = built
    by_id = {r.id: r for r in records}
    for row in table.to_pylist():
        rec = by_id[row["id"]]
        docs = _docs(row["long_prompt"])
        assert [d[0] for d in docs] == list(range(1, len(docs) + 1))
        gold = {(p.title, p.text) for p in rec.supporting}
        placed = [(docs[i][1], docs[i][2]) for i in row["gold_positions"]]
        assert set(placed) == gold and len(placed) == len(gold)
        gold_titles = {match_key(t) for t, _ in gold}
        answers = [match_key(a) for a in rec.answers]
        distractors = [(t, x) for j, (_, t, x) in enumerate(docs) if j not in set(row["gold_positions"])]
        assert len(set(distractors)) == len(distractors), "no duplicate documents"
        for t, x in distractors:
            assert match_key(t) not in gold_titles
            assert not contains_answer(match_key(t + " " + x), answers)
        # the short prompt holds exactly the gold documents, the same instruction and question
        assert {(t, x) for _, t, x in _docs(row["short_prompt"])} == gold
        assert row["short_prompt"].split("</doc>")[-1] == row["long_prompt"].split("</doc>")[-1]


def test_own_paragraphs_come_first(records, tokenizer):
    rec = records[0]
    b = ContextBuilder(tokenizer, SynthConfig(target_len=[4096]), seed=0, pool=records)
    pool = distractor_pool(rec, b)
    own = {(p.title, p.text) for p in rec.paragraphs if not p.is_supporting}
    eligible_own = [
        (p.title, p.text)
        for p in rec.paragraphs
        if not p.is_supporting
        and match_key(p.title) not in {match_key(g.title) for g in rec.supporting}
        and not contains_answer(match_key(p.title + " " + p.text), [match_key(a) for a in rec.answers])
    ]
    assert 0 < len(eligible_own) <= len(own)
    assert set(pool[: len(eligible_own)]) == set(eligible_own)
    assert all(p not in own for p in pool[len(eligible_own) :])
    assert len(pool) == len(set(pool))


def test_hand_made_leaks_are_never_chosen(tokenizer):
    """A pool built so that most paragraphs must be rejected: gold title, answer inside, duplicates."""
    gold = Paragraph(0, "Eiffel Tower", "The Eiffel Tower is in Paris.", True)
    q = QARecord("q1", "Where is the Eiffel Tower?", "Paris", ["City of Light"], [gold], "[]", "toy")
    pool = []
    for i in range(40):
        paras = [
            Paragraph(0, "Eiffel Tower", f"Another page about the tower, number {i}.", True),  # gold title
            Paragraph(1, f"Trip {i}", f"We flew to Paris in spring {i}.", False),  # contains the answer
            Paragraph(2, f"Light {i}", f"The City of Light glows at night {i}.", False),  # contains an alias
            Paragraph(
                3, f"Parisian cafes {i}", f"Parisian cafes number {i} serve coffee.", False
            ),  # ok: not whole word
            Paragraph(4, "Shared", "One paragraph repeated in every record.", False),  # a duplicate across records
        ]
        pool.append(QARecord(f"p{i}", "x?", "Parisian cafes", [], paras, "[]", "toy"))
    b = ContextBuilder(tokenizer, SynthConfig(target_len=[512]), seed=0, pool=pool)
    chosen = distractor_pool(q, b)
    titles = Counter(t for t, _ in chosen)
    assert set(titles) == {f"Parisian cafes {i}" for i in range(40)} | {"Shared"}
    assert titles["Shared"] == 1


@pytest.mark.parametrize("depth, expect", [(0.0, "start"), (0.5, "middle"), (1.0, "end")])
def test_fixed_gold_depth(records, tokenizer, depth, expect):
    table = build_contexts(records[:5], tokenizer, SynthConfig(target_len=[2048], gold_position=depth), pool=records)
    for row in table.to_pylist():
        g, n = row["gold_positions"], row["n_docs"]
        assert g == list(range(g[0], g[0] + len(g))), "gold documents stay one block"
        if expect == "start":
            assert g[0] == 0
        elif expect == "end":
            assert g[-1] == n - 1
        else:
            assert abs(g[0] - round(0.5 * (n - len(g)))) <= 0


def test_deterministic_and_independent_of_batching(records, tokenizer):
    cfg = SynthConfig(target_len=[1500])
    whole = build_contexts(records[:12], tokenizer, cfg, seed=7, pool=records)
    part = build_contexts(records[6:12], tokenizer, cfg, seed=7, pool=records)
    assert whole.slice(6).to_pylist() == part.to_pylist()
    other = build_contexts(records[6:12], tokenizer, cfg, seed=8, pool=records)
    assert other.column("long_prompt").to_pylist() != part.column("long_prompt").to_pylist()


def test_unreachable_targets_fail_or_skip(records, tokenizer):
    # 300 tokens is below every short prompt of the sample.
    with pytest.raises(
        DataError, match=r"cannot build a 300-token context.*target_below_short_prompt.*on_unreachable=skip"
    ):
        build_contexts(records[:3], tokenizer, SynthConfig(target_len=[300]), pool=records)
    drops: Counter = Counter()
    table = build_contexts(
        records[:3],
        tokenizer,
        SynthConfig(target_len=[300, 1024], on_unreachable="skip"),
        pool=records,
        drop=lambda reason, n=1, example=None: drops.update({reason: n}),
    )
    assert drops == Counter({"unreachable:target_below_short_prompt:300": 3})
    assert table.column("target_len").to_pylist() == [1024] * 3
    # A pool of three records cannot fill 16K tokens: an error, never a silently short sample.
    with pytest.raises(DataError, match="pool_exhausted"):
        build_contexts(records[:3], tokenizer, SynthConfig(target_len=[16384]))


def test_parallel_selection_matches_serial(records, tokenizer):
    cfg1 = SynthConfig(target_len=[2048])
    cfg2 = SynthConfig(target_len=[2048], num_proc=2)
    serial = build_contexts(records[:60], tokenizer, cfg1, pool=records)
    b = ContextBuilder(tokenizer, cfg2, pool=records)
    b.config = cfg2
    import solopo.stages.contexts as synth

    usable = records[:60]
    b._register([p for r in usable for p in r.paragraphs])
    plans = synth._parallel_plan(
        b,
        usable,
        b.counter.count_chat([b.prompt([b._pid[(p.title, p.text)] for p in r.supporting], r.question) for r in usable]),
        2,
        None,
    )
    assert [len(p.docs) for p in plans] == serial.column("n_docs").to_pylist()
    assert [p.long_tokens for p in plans] == serial.column("long_tokens").to_pylist()
