"""load + synth through the real Pipeline: no-op rerun, config-change rerun, shard resume, the CLI."""

from __future__ import annotations

import gzip
import shutil

import pytest

from solopo.api import build_config
from solopo.datasets.base import DATA_DIR
from solopo.pipeline import Pipeline, load_manifest, load_output
from solopo.stages import chain
from solopo.stages.synth import SynthStage


def _cfg(run_dir, model, **extra):
    over = {
        "run": {"run_dir": str(run_dir), "model": str(model)},
        "load": {"limit": 24},
        "synth": {"target_len": "1536,2k", "shard_size": 10, "verify_sample": 8},
    }
    for section, values in extra.items():
        over.setdefault(section, {}).update(values)
    return build_config(overrides=over)


def _run(cfg):
    return Pipeline(chain("synth"), cfg).run()


def test_noop_rerun_and_config_change(tmp_path, tiny_model_dir):
    rd = tmp_path / "run"
    first = _run(_cfg(rd, tiny_model_dir))
    assert {k: v["status"] for k, v in first.items()} == {"load": "ran", "synth": "ran"}
    assert first["synth"]["rows"] == 48
    m = load_manifest(rd, "synth")
    assert m["shards"]["count"] == 3 and m["stats"]["verify_max_abs_deviation"] == 0
    assert m["stats"]["verify_prompts"] == 3 * 8  # one sample per shard
    assert (rd / "synth" / "lengths.png").stat().st_size > 0
    mtime = (rd / "synth" / "data.parquet").stat().st_mtime_ns

    again = _run(_cfg(rd, tiny_model_dir))
    assert {k: v["status"] for k, v in again.items()} == {"load": "cached", "synth": "cached"}
    assert (rd / "synth" / "data.parquet").stat().st_mtime_ns == mtime

    # A synth-only change reruns synth, not load.
    tol = _run(_cfg(rd, tiny_model_dir, synth={"tolerance": 0.05}))
    assert {k: v["status"] for k, v in tol.items()} == {"load": "cached", "synth": "ran"}
    # A load change reruns both (the key chain carries it downstream).
    lim = _run(_cfg(rd, tiny_model_dir, load={"limit": 12}, synth={"tolerance": 0.05}))
    assert {k: v["status"] for k, v in lim.items()} == {"load": "ran", "synth": "ran"}
    assert lim["synth"]["rows"] == 24


def test_interrupted_synth_resumes_from_finished_shards(tmp_path, tiny_model_dir, monkeypatch):
    clean_dir, rd = tmp_path / "clean", tmp_path / "interrupted"
    _run(_cfg(clean_dir, tiny_model_dir))
    clean = load_output(clean_dir, "synth")

    real_run = SynthStage.run
    calls = {"n": 0}

    def crash_on_third(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill during shard 3")
        return real_run(self, data)

    monkeypatch.setattr(SynthStage, "run", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(rd, tiny_model_dir))
    assert not (rd / "synth" / "_SUCCESS").exists()
    assert sorted(p.name for p in (rd / "synth" / "shards").glob("part-*.json")) == [
        "part-00000.json",
        "part-00001.json",
    ]
    monkeypatch.setattr(SynthStage, "run", real_run)

    out = _run(_cfg(rd, tiny_model_dir))
    assert out["synth"]["status"] == "ran" and out["load"]["status"] == "cached"
    m = load_manifest(rd, "synth")
    assert m["shards"]["resumed"] == 2 and m["shards"]["count"] == 3
    assert load_output(rd, "synth").to_pylist() == clean.to_pylist()  # same rows as an uninterrupted run


def test_cli_synth_on_a_musique_file_by_path(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from solopo.cli import app

    data = tmp_path / "musique_train.jsonl.gz"
    with open(DATA_DIR / "musique_ans_train_sample.jsonl", "rb") as src, gzip.open(data, "wb") as dst:
        shutil.copyfileobj(src, dst)
    rd = tmp_path / "cli-run"
    args = [
        "synth",
        "--target-len",
        "1536,2k",
        "--data",
        str(data),
        "--run-dir",
        str(rd),
        "--model",
        str(tiny_model_dir),
        "--set",
        "load.limit=10",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = load_output(rd, "synth")
    assert sorted(set(table.column("target_len").to_pylist())) == [1536, 2048] and table.num_rows == 20
    bad = CliRunner().invoke(app, ["synth", "--target-len", "300", *args[3:]])
    assert bad.exit_code == 2
    assert "target_below_short_prompt" in bad.output
