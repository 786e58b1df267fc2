"""The executor on toy stages: no-op reruns, config changes rerun downstream, shard resume, drops, manifests."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from pydantic import ConfigDict, create_model

from solopo.pipeline.config import RunSettings, StageConfig
from solopo.pipeline.errors import ConfigError, SolopoError
from solopo.pipeline.runner import Pipeline, load_output
from solopo.pipeline.stage import Stage

CALLS: list[tuple[str, int]] = []


class SrcConfig(StageConfig):
    n: int = 10


class MulConfig(StageConfig):
    factor: int = 2


# A crash injected from outside the config, like a killed process: the config (and key) stay the same.
KILL_AT_SHARD: list[int] = []


class Src(Stage):
    name = "src"
    Config = SrcConfig
    writes = ("x",)

    def run(self, data):
        CALLS.append(("src", self.config.n))
        return pa.table({"x": list(range(self.config.n))})


class Mul(Stage):
    name = "mul"
    Config = MulConfig
    after = "src"
    reads = ("x",)
    writes = ("x", "y")
    shard_size = 3

    def run(self, data):
        first = data["x"][0].as_py()
        CALLS.append(("mul", first))
        if KILL_AT_SHARD and first == 3 * KILL_AT_SHARD[0]:
            raise RuntimeError("killed")
        keep = [v for v in data["x"].to_pylist() if v % 5 != 4]  # drop 4, 9, ...
        for v in data["x"].to_pylist():
            if v % 5 == 4:
                self.ctx.drop("ends_in_4_or_9", example=str(v))
        self.ctx.stat("n_kept", len(keep), "sum")
        self.ctx.stat("max_x", max(keep, default=-1), "max")
        return pa.table({"x": keep, "y": [v * self.config.factor for v in keep]})


class Bad(Stage):
    name = "bad"
    Config = MulConfig
    after = "src"
    reads = ("nope",)
    writes = ("x",)


Cfg = create_model(
    "Cfg",
    __config__=ConfigDict(extra="forbid", frozen=True),
    run=(RunSettings, RunSettings()),
    src=(SrcConfig, SrcConfig()),
    mul=(MulConfig, MulConfig()),
    bad=(MulConfig, MulConfig()),
)


def cfg(tmp_path, **kw):
    return Cfg(run=RunSettings(run_dir=str(tmp_path / "run")), **kw)


def test_rerun_same_config_is_noop_and_change_reruns_downstream(tmp_path):
    CALLS.clear()
    s1 = Pipeline([Src, Mul], cfg(tmp_path)).run()
    assert [v["status"] for v in s1.values()] == ["ran", "ran"]
    out = load_output(tmp_path / "run", "mul")
    assert out["y"].to_pylist() == [0, 2, 4, 6, 10, 12, 14, 16]
    n_calls = len(CALLS)
    s2 = Pipeline([Src, Mul], cfg(tmp_path)).run()
    assert [v["status"] for v in s2.values()] == ["cached", "cached"]
    assert len(CALLS) == n_calls  # nothing ran
    # An upstream config change reruns src and (through the key chain) mul.
    s3 = Pipeline([Src, Mul], cfg(tmp_path, src=SrcConfig(n=4))).run()
    assert [v["status"] for v in s3.values()] == ["ran", "ran"]
    assert load_output(tmp_path / "run", "mul")["x"].to_pylist() == [0, 1, 2, 3]
    # A downstream-only change keeps src cached.
    s4 = Pipeline([Src, Mul], cfg(tmp_path, src=SrcConfig(n=4), mul=MulConfig(factor=3))).run()
    assert [v["status"] for v in s4.values()] == ["cached", "ran"]


def test_manifest_records_drops_stats_and_config(tmp_path):
    Pipeline([Src, Mul], cfg(tmp_path)).run()
    m = json.loads((tmp_path / "run" / "mul" / "manifest.json").read_text())
    assert m["rows_in"] == 10 and m["rows_out"] == 8
    assert m["drops"] == {"ends_in_4_or_9": 2}
    assert m["drop_examples"] == {"ends_in_4_or_9": ["4", "9"]}
    assert m["stats"] == {"n_kept": 8, "max_x": 8}
    assert m["config"] == {"factor": 2}
    assert m["shards"]["count"] == 4
    assert "torch" in m["libraries"]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "mul" / "_SUCCESS").read_text().strip() == m["key"]


def test_interrupted_stage_resumes_from_finished_shards(tmp_path):
    CALLS.clear()
    KILL_AT_SHARD[:] = [2]
    try:
        with pytest.raises(RuntimeError, match="killed"):
            Pipeline([Src, Mul], cfg(tmp_path)).run()
    finally:
        KILL_AT_SHARD.clear()
    assert ("mul", 0) in CALLS and ("mul", 3) in CALLS
    shards = sorted(p.name for p in (tmp_path / "run" / "mul" / "shards").glob("part-*.json"))
    assert shards == ["part-00000.json", "part-00001.json"]
    assert not (tmp_path / "run" / "mul" / "_SUCCESS").exists()
    CALLS.clear()
    Pipeline([Src, Mul], cfg(tmp_path)).run()
    assert ("mul", 0) not in CALLS and ("mul", 3) not in CALLS  # finished shards are read back
    assert ("mul", 6) in CALLS and ("mul", 9) in CALLS
    m = json.loads((tmp_path / "run" / "mul" / "manifest.json").read_text())
    assert m["shards"]["resumed"] == 2
    assert m["drops"] == {"ends_in_4_or_9": 2}  # counts of resumed shards are kept
    assert m["stats"] == {"n_kept": 8, "max_x": 8}
    assert load_output(tmp_path / "run", "mul")["y"].to_pylist() == [0, 2, 4, 6, 10, 12, 14, 16]
    assert not (tmp_path / "run" / "mul" / "shards").exists()  # cleaned after success


def test_shards_of_another_config_are_discarded(tmp_path):
    KILL_AT_SHARD[:] = [2]
    try:
        with pytest.raises(RuntimeError):
            Pipeline([Src, Mul], cfg(tmp_path)).run()
    finally:
        KILL_AT_SHARD.clear()
    CALLS.clear()
    Pipeline([Src, Mul], cfg(tmp_path, mul=MulConfig(factor=5))).run()
    assert ("mul", 0) in CALLS  # recomputed: old shards were for factor=2
    assert load_output(tmp_path / "run", "mul")["y"].to_pylist()[:2] == [0, 5]


def test_chain_check_reports_missing_columns_before_running(tmp_path):
    CALLS.clear()
    with pytest.raises(ConfigError, match=r"stage 'bad' reads columns \['nope'\]"):
        Pipeline([Src, Bad], cfg(tmp_path)).run()
    assert CALLS == []


def test_missing_upstream_output_is_a_clear_error(tmp_path):
    from solopo.api import build_config
    from solopo.stages import chain

    config = build_config(overrides={"run": {"run_dir": str(tmp_path / "run")}})
    with pytest.raises(SolopoError, match="needs the output of 'load', which has not run"):
        Pipeline(chain("synth", start="synth"), config).run()


class Logs(Src):
    """A stage that leaves a log beside its table, as sample and eval leave vllm.log."""

    def run(self, data):
        (self.ctx.out_dir / "engine.log").write_text("engine started\n")
        return super().run(data)


def test_a_log_appended_after_the_stage_reruns_nothing(tmp_path):
    """vLLM's engine process can write to its log after the stage's manifest was written (its exit warnings): a
    log is listed by size only and never verified, so a rerun stays a no-op."""
    assert [v["status"] for v in Pipeline([Logs], cfg(tmp_path)).run().values()] == ["ran"]
    with open(tmp_path / "run" / "src" / "engine.log", "a") as f:
        f.write("resource_tracker: There appear to be 1 leaked shared_memory objects to clean up at shutdown\n")
    assert [v["status"] for v in Pipeline([Logs], cfg(tmp_path)).run().values()] == ["cached"]
