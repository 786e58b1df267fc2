"""Recipe test: the real `solopo run-all` CLI, reduced, end to end, then a no-op rerun and `solopo eval`.

A random 2-layer model never answers a MuSiQue question right, so no preference pair could be selected from
its samples; the chain runs on the real embedded SmolLM2-135M-Instruct instead (it answers short questions
about half the time), with counts cut to a minimum.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from solopo.cli import app

pytestmark = pytest.mark.slow

# Sized for CI on 2 cores: sampling is seeded, so the same questions yield the same pairs on every run.
REDUCED = [
    "load.limit=10",
    "synth.target_len=[1280]",
    "synth.on_unreachable=skip",
    "sample.n=6",
    "sample.max_tokens=96",
    "train.max_steps=1",
    "train.grad_accum=2",
    "eval.lengths=[1280]",
    "eval.n_questions=2",
    "eval.max_tokens=32",
    "eval.datasets=[musique,hotpotqa]",
]


def _args(run_dir: Path) -> list[str]:
    out = ["run-all", "--preset", "cpu-demo", "--run-dir", str(run_dir), "--log-level", "warning"]
    for s in REDUCED:
        out += ["--set", s]
    return out


def test_run_all_end_to_end_then_noop(tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    res = runner.invoke(app, _args(run_dir))
    assert res.exit_code == 0, res.output
    for stage in ("load", "synth", "sample", "select", "export", "train", "eval"):
        assert (run_dir / stage / "_SUCCESS").exists(), stage
        m = json.loads((run_dir / stage / "manifest.json").read_text())
        assert m["rows_out"] >= 1 or stage in ("select", "export"), (stage, m["rows_out"])
    # The report compares base and trained side by side, per dataset and length.
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert len(report["models"]) == 2 and report["models"][0].startswith("base")
    assert {a["dataset"] for a in report["accuracy"]} == {"musique", "hotpotqa"}
    assert (run_dir / "eval" / "accuracy_vs_length.png").stat().st_size > 1000
    assert "Long-context QA" in res.output
    # The trained checkpoint loads with plain transformers.
    model_path = run_dir / pq.read_table(run_dir / "train" / "data.parquet").column("model_path")[0].as_py()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_path)
    # Same config again: every stage is cached.
    res2 = runner.invoke(app, _args(run_dir))
    assert res2.exit_code == 0, res2.output
    assert res2.output.count("cached") == 7, res2.output
