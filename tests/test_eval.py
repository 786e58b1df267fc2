"""The eval stage end to end with a scripted backend (no vLLM engine, no weights): run settings reach the
prompts and the generation budget, cells over the context are n/a, the match rule reaches sub-EM, paired
comparisons of constructed models, and a report.json that stands alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from solopo.api import build_config
from solopo.backends import Generation, render_chat_ids
from solopo.metrics import normalize_answer
from solopo.pipeline.runner import Pipeline
from solopo.stages.eval_report import NA_CONTEXT, format_cell, summarize
from solopo.stages.evaluate import CompareEvalStage


@pytest.fixture(scope="module")
def golds() -> dict[str, list[str]]:
    """question -> answers of the shipped MuSiQue dev sample (what eval asks)."""
    from solopo.datasets import load_records

    recs = load_records(
        "musique-dev-sample", dataset="musique", split="validation", answerable_only=True, on_bad_record="skip"
    )
    return {r.question: list(r.answers) for r in recs}


class ScriptedBackend:
    """Answers by a per-model policy: 'right' (first gold), 'wrong', 'half' (right on every other question,
    in eval order), 'glued' (a gold glued to a prefix: only a substring match finds it)."""

    name = "scripted"
    dtype = "none"
    calls: list[dict] = []

    def __init__(self, path: str, policy: str, tokenizer, golds: dict[str, list[str]], max_context: int | None):
        self.path, self.policy, self.tokenizer, self.golds = path, policy, tokenizer, golds
        self._max_context = max_context

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        return [len(render_chat_ids(self.tokenizer, p)) for p in prompts]

    def _gold(self, prompt: str) -> str:
        q = max((q for q in self.golds if q in prompt), key=len)
        return self.golds[q][0]

    def generate(self, prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        ScriptedBackend.calls.append({"path": self.path, "prompts": list(prompts), "max_tokens": max_tokens})
        out = []
        for i, p in enumerate(prompts):
            gold = self._gold(p)
            answer = {
                "right": gold,
                "wrong": "xqzzy",
                "half": gold if i % 2 == 0 else "xqzzy",
                "glued": "qq" + normalize_answer(gold),
            }[self.policy]
            out.append([Generation(text=f"Reasoning.\nThe answer is: {answer}", finish_reason="stop", num_tokens=9)])
        if progress:
            progress(len(prompts), 9 * len(prompts))
        return out

    def close(self) -> None:
        pass


def _model_copy(src: Path, dst: Path, record: dict | None = None) -> Path:
    """The tiny model under another name (weights hard-linked: the scripted backend never loads them, but the
    model dir is checked whole when resolved)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (os.link if f.name.endswith(".safetensors") else shutil.copy)(f, dst / f.name)
    if record is not None:
        (dst / "train_result.json").write_text(json.dumps(record))
    return dst


@pytest.fixture
def scripted(monkeypatch, tokenizer, golds):
    """Patch get_backend: a model dir's name picks its policy; max_context via the returned setter."""
    import solopo.backends

    state = {"max_context": None, "opts": []}
    ScriptedBackend.calls = []

    def fake_get_backend(name, model_path, ctx_note=None, **opts):
        state["opts"].append(opts)
        policy = Path(model_path).name.split("-")[0]
        return ScriptedBackend(model_path, policy, tokenizer, golds, state["max_context"])

    monkeypatch.setattr(solopo.backends, "get_backend", fake_get_backend)
    return state


def _run(tmp_path: Path, models: dict[str, Path], base: Path | None, *sets: str) -> Path:
    run_dir = tmp_path / "run"
    over = [
        f"run.run_dir={run_dir}",
        "eval.lengths=[1024]",
        "eval.n_questions=4",
        "eval.datasets=[musique]",
        f"eval.include_base={'true' if base else 'false'}",
        "eval.bootstrap_resamples=2000",
        *sets,
    ]
    if base is not None:
        over.append(f"run.model={base}")
    cfg = build_config(None, over)
    cfg = cfg.model_copy(
        update={"eval": cfg.eval.model_copy(update={"models": [f"{k}={v}" for k, v in models.items()]})}
    )
    Pipeline([CompareEvalStage], cfg).run()
    return run_dir / "eval"


def test_eval_uses_the_runs_synth_settings_and_sample_budget(tmp_path, tiny_model_dir, scripted):
    right = _model_copy(tiny_model_dir, tmp_path / "right-model")
    marks = [
        "synth.doc_template='DOCMARK {i} | {title} | {text}'",
        "synth.prompt_template='PROMPTMARK {documents} Q: {question}'",
        "sample.max_tokens=77",
    ]
    out = _run(tmp_path, {"m": right}, None, *marks)
    (call,) = ScriptedBackend.calls
    assert call["max_tokens"] == 77  # the run's sample budget, not eval's own default
    assert call["prompts"] and all(p.startswith("PROMPTMARK ") and "DOCMARK 1 | " in p for p in call["prompts"])
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["max_tokens"] == 77 and report["settings"]["max_tokens_from"] == "sample.max_tokens"
    assert report["settings"]["synth"]["prompt_template"].startswith("PROMPTMARK")
    assert "max_tokens 77 (from sample.max_tokens)" in (out / "report.md").read_text()

    # eval.max_tokens overrides, and the changed budget reruns the stage (not a stale cache hit).
    ScriptedBackend.calls = []
    out = _run(tmp_path, {"m": right}, None, *marks, "eval.max_tokens=33")
    assert [c["max_tokens"] for c in ScriptedBackend.calls] == [33]
    assert json.loads((out / "report.json").read_text())["settings"]["max_tokens_from"] == "eval.max_tokens"
    # A changed synth setting reruns standalone eval too (its key does not come from an upstream stage).
    ScriptedBackend.calls = []
    _run(tmp_path, {"m": right}, None, *marks[:1], "synth.prompt_template='OTHER {documents} Q: {question}'",
         "eval.max_tokens=33")  # fmt: skip
    assert ScriptedBackend.calls and ScriptedBackend.calls[0]["prompts"][0].startswith("OTHER ")


def test_cells_over_the_context_are_na_not_zero(tmp_path, tiny_model_dir, scripted):
    scripted["max_context"] = 1600  # 1K prompts + 64 tokens fit; 2K prompts do not
    right = _model_copy(tiny_model_dir, tmp_path / "right-model")
    out = _run(tmp_path, {"m": right}, None, "eval.lengths=[1024,2048]", "eval.max_tokens=64")
    report = json.loads((out / "report.json").read_text())
    cells = {a["target_len"]: a for a in report["accuracy"]}
    assert cells[1024]["status"] == "measured" and cells[1024]["sub_em_pct"] == 100.0
    na = cells[2048]
    assert na["status"] == NA_CONTEXT and na["n"] == 0 and na["sub_em_pct"] is None
    assert na["skipped"]["model_context"] == 1600 and na["skipped"]["max_tokens"] == 64
    assert na["skipped"]["max_prompt_tokens"] + 64 > 1600
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| m |"))
    assert row.split(" | ")[2] == NA_CONTEXT and "0.0 (n=" not in md
    # Nothing at 2K was sent to the model; the skip is a drop and a note in the manifest.
    assert all("2048" not in str(len(p)) for p in ScriptedBackend.calls[0]["prompts"])
    assert len(ScriptedBackend.calls[0]["prompts"]) == cells[1024]["n"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["drops"]["exceeds_context"] == 4
    assert any(NA_CONTEXT in n and "context of 1600" in n for n in manifest["notes"])


@pytest.mark.parametrize("rule", ["word", "substring"])
def test_match_rule_reaches_sub_em(tmp_path, tiny_model_dir, scripted, rule):
    glued = _model_copy(tiny_model_dir, tmp_path / "glued-model")  # answers 'qq<gold>': a substring, not a word
    out = _run(tmp_path, {"m": glued}, None, f"eval.match={rule}")
    report = json.loads((out / "report.json").read_text())
    (cell,) = report["accuracy"]
    if rule == "substring":
        assert cell["sub_em_pct"] == 100.0  # the normalized gold is inside every prediction
    else:
        assert cell["sub_em_pct"] < 100.0  # 'qq<gold>' is not the gold as a word (only an alias may still be)
    from solopo.metrics import sub_em
    from solopo.pipeline.io import read_parquet

    for r in read_parquet(out / "data.parquet").to_pylist():
        assert r["sub_em"] == sub_em(r["prediction"], r["answers"], match=rule)
    assert report["settings"]["match"] == rule
    assert f"Sub-EM ({rule} rule)" in (out / "report.md").read_text()


def test_paired_comparisons_of_constructed_models(tmp_path, tiny_model_dir, scripted):
    """base always wrong, solo always right, long right on every other question: known differences."""
    base = _model_copy(tiny_model_dir, tmp_path / "wrong-base")
    solo = _model_copy(tiny_model_dir, tmp_path / "right-solo", {"algo": "orpo", "mode": "solo"})
    long = _model_copy(tiny_model_dir, tmp_path / "half-long", {"algo": "orpo", "mode": "long"})
    out = _run(tmp_path, {"solo": solo, "long": long}, base, "eval.n_questions=8")
    report = json.loads((out / "report.json").read_text())
    base_label = report["models"][0]
    assert base_label.startswith("base (")
    comps = {(c["model"], c["reference"]): c for c in report["comparisons"]}
    assert set(comps) == {("solo", base_label), ("long", base_label), ("solo", "long")}
    c = comps[("solo", base_label)]
    n = c["n_pairs"]
    assert n == 8 and c["diff_pct_points"] == 100.0 and c["significant"]
    assert (c["ci95_low_pct_points"], c["ci95_high_pct_points"]) == (100.0, 100.0)
    assert c["model_only_correct"] == 8 and c["reference_only_correct"] == 0
    assert c["mcnemar_p"] == pytest.approx(2 / 2**8)  # 8 discordant pairs, all one way
    c = comps[("solo", "long")]
    assert c["diff_pct_points"] == 50.0 and c["model_only_correct"] == 4 and c["reference_only_correct"] == 0
    assert c["mcnemar_p"] == pytest.approx(2 / 2**4)
    assert c["bootstrap_excludes_0"] == (c["ci95_low_pct_points"] > 0)
    assert not c["significant"]  # a 4/0 split: exact p = 0.125, whatever the bootstrap interval says
    md = (out / "report.md").read_text()
    assert "## Paired comparisons" in md and "| solo | long | musique | 1k | 8 | +50.0 |" in md
    assert "| 4 / 0 | 0.125 | not significant |" in md  # solo vs long
    assert "| 8 / 0 | 0.008 | **significant** |" in md  # solo vs base: p = 2/256
    assert "both the 95% paired bootstrap interval excludes 0 and the exact two-sided McNemar test" in md


def test_report_json_stands_alone(tmp_path, tiny_model_dir, scripted):
    base = _model_copy(tiny_model_dir, tmp_path / "half-base")
    out = _run(tmp_path, {}, base, "eval.depths=[0,1]")
    text = (out / "report.json").read_text()
    report = json.loads(text)
    # No machine path: models by folder name (or hub id, or run-dir-relative path).
    assert str(tmp_path) not in text and str(tmp_path) not in (out / "report.md").read_text()
    # Run identity, the questions asked.
    run = report["run"]
    assert run["run_id"] == "run" and len(run["config_sha256"]) == 64 and run["created"].endswith("+00:00")
    ids = report["question_ids"]["musique"]
    assert len(ids) == 4 and ids == sorted(ids)
    assert report["unit"] == "percent" and "*_pct" in report["units"]
    # One unit everywhere: every rate field is named *_pct and lies in 0..100.
    for cell in report["accuracy"] + report["depth"]:
        assert "sub_em" not in cell and 0 <= cell["ci95_low_pct"] <= cell["sub_em_pct"] <= cell["ci95_high_pct"] <= 100
    s = report["settings"]
    for key in ("n_per_cell", "max_tokens", "match", "seed", "versions", "bootstrap", "synth", "sources"):
        assert key in s, key
    assert s["n_per_cell"] == [8]  # 4 questions x 2 depths
    label = report["models"][0]
    assert report["model_paths"] == {label: "half-base"}
    (info,) = report["model_info"]
    assert info["backend"] == "scripted" and info["role"] == "base"
    # The dtype the engine ran: asked for fp32 on CPU (the default), never "auto".
    assert (info["dtype"], info["dtype_from"]) == ("float32", "requested (eval.dtype)")
    assert scripted["opts"][0]["dtype"] == "float32" and s["dtype_requested"] == "float32"
    assert {d["depth"] for d in report["depth"]} == {0.0, 1.0}
    md = (out / "report.md").read_text()
    assert "![accuracy vs length](accuracy_vs_length.png)" in md and "![accuracy vs depth](accuracy_vs_depth.png)" in md
    for png in report["plots"]:
        assert (out / png).stat().st_size > 1000
    assert "## How many questions" in md and "--n-questions 395" in md and "80% of the time" in md
    assert "- inference dtype: float32 (default on CPU: bf16" in md and "Run `run`" in md


def test_cell_format_and_plot_draws_the_intervals(tmp_path, monkeypatch):
    rows = [
        {"model": m, "dataset": "musique", "target_len": 1024, "depth": -1.0, "id": f"q{i}", "long_tokens": 1000,
         "sub_em": i < k, "finish_reason": "stop", "model_path": f"/m/{m}"}
        for m, k in (("a", 2), ("b", 1)) for i in range(8)
    ]  # fmt: skip
    report = summarize(rows)
    cell = next(a for a in report["accuracy"] if a["model"] == "a")
    assert format_cell(cell) == "25.0 [7.1, 59.1] (n=8)"
    assert report["comparisons"] == []  # no base and no SoLo/baseline: nothing to pair

    import matplotlib.axes

    from solopo.stages.eval_report import plot_accuracy

    drawn = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        drawn.append((list(y), [list(e) for e in yerr]))
        return real(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    plot_accuracy(report, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000
    (ys_a, (lo_a, hi_a)), _ = drawn
    assert (
        ys_a == [25.0]
        and lo_a == [pytest.approx(25.0 - 7.1479, abs=1e-3)]
        and hi_a == [pytest.approx(59.0725 - 25.0, abs=1e-3)]
    )


def test_cli_eval_from_run_takes_its_settings_and_excludes_its_ids(tmp_path, tiny_model_dir, scripted, golds):
    """`solopo eval --from-run RUN`: the run's synth templates and sample.max_tokens, its training ids excluded;
    --max-tokens and --match override."""
    import pyarrow as pa
    from typer.testing import CliRunner

    from solopo.cli import app
    from solopo.datasets import load_records
    from solopo.pipeline.config import dump_config
    from solopo.pipeline.io import write_parquet, write_text

    train_run = tmp_path / "train-run"
    saved = build_config(None, ["synth.prompt_template='RUNMARK {documents} Q: {question}'", "sample.max_tokens=55"])
    write_text(dump_config(saved), train_run / "config.yaml")
    first = load_records("musique-dev-sample", dataset="musique", split="validation", answerable_only=True)[0]
    write_parquet(pa.table({"id": [first.id]}), train_run / "load" / "data.parquet")
    right = _model_copy(tiny_model_dir, tmp_path / "right-model")
    args = ["eval", "-m", f"r={right}", "--from-run", str(train_run), "--run-dir", str(tmp_path / "ev"),
            "--lengths", "1k", "--datasets", "musique", "--n-questions", "3", "--log-level", "warning"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (call,) = ScriptedBackend.calls
    assert call["max_tokens"] == 55 and all(p.startswith("RUNMARK ") for p in call["prompts"])
    assert not any(first.question in p for p in call["prompts"])  # a training id is never asked
    manifest = json.loads((tmp_path / "ev" / "eval" / "manifest.json").read_text())
    assert manifest["drops"]["musique:overlaps_training_ids"] == 1
    assert "100.0 [" in res.output and "(n=3)" in res.output  # the printed report has intervals

    ScriptedBackend.calls = []
    res = CliRunner().invoke(app, [*args, "--max-tokens", "21", "--match", "substring", "--rerun"])
    assert res.exit_code == 0, res.output
    assert ScriptedBackend.calls[0]["max_tokens"] == 21 and "Sub-EM (substring rule)" in res.output
    res = CliRunner().invoke(app, [*args[:4], str(tmp_path / "nowhere"), *args[5:]])
    assert res.exit_code == 2 and "no config.yaml" in res.output


def test_eval_adds_its_table_to_the_card_of_the_model_trained_in_the_run(tmp_path, tiny_model_dir, scripted):
    """run-all's eval writes its results into the trained model's card; a --model input dir stays untouched."""
    import pyarrow as pa

    from solopo.pipeline.io import write_parquet, write_text
    from solopo.stages.evaluate import EvalStage

    card = (
        "---\nlicense: apache-2.0\ntags:\n- solopo\n---\n# m\n\n<!-- solopo:eval:start -->\n<!-- solopo:eval:end -->\n"
    )
    run_dir = tmp_path / "run"
    trained = _model_copy(tiny_model_dir, run_dir / "train/models/right-solo", {"algo": "orpo", "mode": "solo"})
    other = _model_copy(tiny_model_dir, tmp_path / "half-other")
    for d in (trained, other):
        (d / "README.md").write_text(card)
    write_parquet(  # train stores its model path relative to the run dir
        pa.table({"model_path": ["train/models/right-solo"], "algo": ["orpo"], "mode": ["solo"]}),
        run_dir / "train" / "data.parquet",
    )
    write_text("trainkey\n", run_dir / "train" / "_SUCCESS")
    base = _model_copy(tiny_model_dir, tmp_path / "wrong-base")
    cfg = build_config(
        None,
        [f"run.run_dir={run_dir}", f"run.model={base}", "eval.lengths=[1024]", "eval.n_questions=4",
         "eval.datasets=[musique]", "eval.bootstrap_resamples=500"],
    )  # fmt: skip
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"models": [f"other={other}"]})})
    Pipeline([EvalStage], cfg).run()
    text = (trained / "README.md").read_text()
    assert "## Evaluation" in text and "| musique | 1k | 100.0 [51.0, 100.0] (n=4) |" in text
    # Accuracy and differences in separate tables, each under a header of its unit.
    acc, comp = text.split("### Paired comparisons")
    assert "| dataset | length | sub-EM % [95% interval] (n) |" in acc and "points" not in acc.split("\n\n")[1]
    assert "| vs | dataset | length | difference (points) | 95% interval (points) | McNemar p | significant |" in comp
    assert "| base (wrong-base) | musique | 1k | +100.0 | [+100.0, +100.0] | 0.125 | no |" in comp
    assert "word rule" in text
    assert str(tmp_path) not in text  # no machine path in a card
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    info = {m["label"]: m for m in report["model_info"]}
    assert info["orpo-solo"]["training"]["lr"] == 5e-7  # the run's train.lr trained it
    assert info["orpo-solo"]["path"] == "train/models/right-solo" and info["other"]["path"] == "half-other"
    assert (other / "README.md").read_text() == card
    # Idempotent: a rerun replaces the section instead of adding a second one.
    Pipeline([EvalStage], cfg).run(force=("eval",))
    assert (trained / "README.md").read_text().count("## Evaluation") == 1


def test_truncation_gap_between_models_is_flagged():
    """A model whose answers are cut at max_tokens far more often than another's gets a check line."""

    def rows(model: str, cut: int) -> list[dict]:
        return [
            {"model": model, "dataset": "musique", "target_len": 1024, "depth": -1.0, "id": f"q{i}",
             "long_tokens": 900, "sub_em": False, "finish_reason": "length" if i < cut else "stop"}
            for i in range(32)
        ]  # fmt: skip

    report = summarize(rows("base", 11) + rows("trained", 19))  # 34.4% vs 59.4%: the cpu-demo's gap
    assert report["truncated_pct_by_model"] == {"base": 34.375, "trained": 59.375}
    (flag,) = report["flags"]
    assert "differ by 25.0 points between base (34.4%) and trained (59.4%)" in flag
    from solopo.stages.eval_report import report_markdown

    assert "> **Check:** answers cut at max_tokens differ by 25.0 points" in report_markdown(report)
    close = summarize(rows("base", 12) + rows("trained", 13))  # 12/32 vs 13/32 (fp32): no flag
    assert close["flags"] == []


def test_training_settings_read_from_a_solopo_model_card(tmp_path, tiny_model_dir):
    """A checkpoint solopo trained (its card's settings table, HF's all_results.json / trainer_state.json) gives
    algo, mode, alpha, beta, lr, steps and rows; a plain checkpoint gives None."""
    from solopo.stages.evaluate import training_record
    from solopo.training.model_card import write_model_card

    trained = _model_copy(tiny_model_dir, tmp_path / "orpo-solo")
    result = {"algo": "orpo", "mode": "solo", "alpha": 1.0, "beta": 0.1, "steps": 3, "examples": 24,
              "target_len": 2048, "dtype": "float32", "final": {}}  # fmt: skip
    train_config = {"lr": 1e-6, "micro_batch_size": 1, "grad_accum": 8, "orpo_lambda": 0.1}
    write_model_card(trained, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", result=result,
                     train_config=train_config, datasets=["dgslibisey/MuSiQue"])  # fmt: skip
    (trained / "all_results.json").write_text(json.dumps({"train_samples": 24, "epoch": 0.125}))
    rec = training_record(str(trained))
    assert rec == {"algo": "orpo", "mode": "solo", "alpha": 1.0, "beta": 0.1, "lr": 1e-6, "steps": 3, "rows": 24,
                   "target_len": 2048, "dtype": "float32"}  # fmt: skip
    assert training_record(str(_model_copy(tiny_model_dir, tmp_path / "plain"))) is None
    assert training_record(str(tmp_path / "hub-org/not-a-dir")) is None


def test_effective_dtype_is_never_auto(monkeypatch):
    from solopo.stages.evaluate import effective_dtype

    class Engine:
        dtype = "auto"

    reported = Engine()
    reported.effective_dtype = "torch.bfloat16"
    assert effective_dtype(reported, "float32") == ("bfloat16", "reported by the engine")
    assert effective_dtype(Engine(), "float32") == ("float32", "requested (eval.dtype)")
    resolved = Engine()
    resolved.dtype = "float32"  # the transformers backend resolves auto itself
    assert effective_dtype(resolved, "auto") == ("float32", "resolved by the backend")
    import solopo.hardware

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(solopo.hardware, "cpu_has_native_bf16", lambda native=native: native)
        got, how = effective_dtype(Engine(), "auto")
        assert got == expected and "solopo.hardware" in how


def test_trained_models_training_settings_reach_the_report(tmp_path, tiny_model_dir, scripted):
    """--model dirs with a training record are reported with their settings; lr and dtype from the record."""
    solo = _model_copy(tiny_model_dir, tmp_path / "right-solo", {"algo": "orpo", "mode": "solo", "lr": 2e-6,
                                                                  "steps": 5, "examples": 40})  # fmt: skip
    out = _run(tmp_path, {"solo": solo}, None)
    report = json.loads((out / "report.json").read_text())
    (info,) = report["model_info"]
    assert info["training"]["algo"] == "orpo" and info["training"]["lr"] == 2e-6
    assert (info["training"]["steps"], info["training"]["rows"]) == (5, 40)
    assert info["path"] == "right-solo"
    assert "trained: algo orpo, mode solo, lr 2e-06, steps 5, rows 40" in (out / "report.md").read_text()
