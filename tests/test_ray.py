"""engine=ray: Ray Data replicas give the local engine's samples (any replica count, shard size, batch size),
stream finished shards to disk so a killed job resumes, retry failed replica calls and report a replica that
keeps failing with its own error; bad addresses and layouts fail with a message. A local Ray of 2 CPUs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ConfigDict, create_model
from test_sample import config, synth_rows, write_synth

from solopo.engines.ray_data import RayEngineError, RayLayout, check_resources
from solopo.pipeline.config import RunSettings, StageConfig, build_config
from solopo.pipeline.errors import MissingDependencyError
from solopo.pipeline.io import read_json, read_parquet
from solopo.pipeline.runner import Pipeline
from solopo.pipeline.stage import Stage
from solopo.stages.sample import SampleStage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import logging

    if importlib.util.find_spec("vllm") is not None:
        from solopo.hardware import vllm_cpu_env

        # Before ray.init: the replicas inherit the environment of the Ray it starts (in-process engines, as in
        # tests/test_vllm.py, and the CPU settings the backend would otherwise set in each replica).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm_cpu_env()

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 1024 * 1024,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def sample_table(tmp_path, name, model_dir, rows, **sample) -> tuple[pa.Table, dict]:
    run_dir = tmp_path / name
    write_synth(run_dir, rows)
    Pipeline([SampleStage], config(run_dir, model_dir, **sample)).run()
    return read_parquet(run_dir / "sample" / "data.parquet"), read_json(run_dir / "sample" / "manifest.json")


def by_id(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: r["id"])


# --- same results as local --------------------------------------------------------------------------
def test_ray_equals_local_for_any_layout(tmp_path, tiny_model_dir, local_ray):
    """Sampled (T=0.85), several shards streamed at once, 2 replicas, batch boundaries unlike local's.
    batch_size=n puts one prompt per generate call, so this holds whatever the backend's batch seeding."""
    rows = synth_rows(7)
    common = dict(n=2, max_tokens=6, batch_size=2, temperature=0.85)
    local, _ = sample_table(tmp_path, "local", tiny_model_dir, rows, shard_size=100, **common)
    ray2, m2 = sample_table(
        tmp_path, "ray2", tiny_model_dir, rows, shard_size=3, engine="ray", replicas=2, ray_batch_prompts=2, **common
    )
    ray1, m1 = sample_table(
        tmp_path, "ray1", tiny_model_dir, rows, shard_size=100, engine="ray", replicas=1, ray_batch_prompts=3, **common
    )
    assert local.num_rows == 7
    assert by_id(ray2) == by_id(local)
    assert by_id(ray1) == by_id(local)
    # The streaming path wrote 3 shards; stats summed over them as in the local loop.
    assert m2["shards"]["count"] == 3 and m2["shards"]["resumed"] == 0
    assert m2["stats"]["engine"] == "ray" and m2["stats"]["questions"] == 7 and m2["stats"]["prompts"] == 7
    assert m2["stats"]["generated_tokens"] == sum(sum(r["sample_tokens"]) for r in local.to_pylist())
    assert m1["shards"]["count"] == 1 and m1["stats"]["engine"] == "ray"
    # the dtype the replicas ran in (issue 22.3), not "auto"
    from solopo.hardware import cpu_has_native_bf16

    assert m2["stats"]["dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")


def _batch_seeding_is_per_prompt(model_dir) -> bool:
    """Whether the transformers backend gives a prompt the same samples alone as inside a batch (issue 8
    item 3); until it does, no engine can make batched sampling independent of batch boundaries."""
    from solopo.backends import get_backend

    b = get_backend("transformers", str(model_dir), batch_size=8, dtype="float32")
    rows = synth_rows(2)
    p = [r["short_prompt"] for r in rows]
    kw = dict(n=2, temperature=0.85, top_p=1.0, max_tokens=6)
    together = b.generate(p, seed=[11, 22], **kw)
    alone = b.generate(p[1:], seed=[22], **kw)
    return together[1] == alone[0]


def test_ray_equals_local_with_batched_sampling(tmp_path, tiny_model_dir, local_ray):
    """batch_size > n: several prompts per generate call, grouped differently on each side. fp32: the README's
    condition (in bf16 a prompt's logits depend on its batch neighbours; issue 22: 10/12 samples equal)."""
    if not _batch_seeding_is_per_prompt(tiny_model_dir):
        pytest.xfail("the transformers backend seeds a batch with its first prompt's seed (issue 8 item 3)")
    rows = synth_rows(6)
    common = dict(n=2, max_tokens=6, batch_size=8, temperature=0.85, dtype="float32")
    local, _ = sample_table(tmp_path, "local", tiny_model_dir, rows, shard_size=100, **common)
    ray2, _ = sample_table(
        tmp_path, "ray2", tiny_model_dir, rows, shard_size=4, engine="ray", replicas=2, ray_batch_prompts=3, **common
    )
    assert by_id(ray2) == by_id(local)


def test_ray_replicas_render_the_runs_chat_format(tmp_path, tiny_model_dir, local_ray):
    """run.chat_template and run.system_prompt travel to the replicas with the backend's options (issue 26.10):
    Ray's samples are the local engine's with the same chat format, and not those of the default format."""
    from test_chat import SYSTEM, TEMPLATE

    rows = synth_rows(3)

    def samples(name: str, chat: dict, **sample) -> list[dict]:
        run_dir = tmp_path / name
        write_synth(run_dir, rows)
        sample = {"backend": "transformers", "n": 2, "max_tokens": 6, "temperature": 0.85, **sample}
        run = {"run_dir": str(run_dir), "model": str(tiny_model_dir), **chat}
        Pipeline([SampleStage], build_config(overrides={"run": run, "sample": sample})).run()
        return by_id(read_parquet(run_dir / "sample" / "data.parquet"))

    chat = {"chat_template": TEMPLATE, "system_prompt": SYSTEM}
    local = samples("local", chat)
    assert samples("ray", chat, engine="ray", replicas=1) == local
    assert samples("default", {}) != local  # the format changes the samples: the equality above means something


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_ray_equals_local_with_vllm(tmp_path, local_ray, tmp_path_factory):
    """vLLM on Ray replicas runs and records like the local engine. Equal samples here (the tiny model in fp32,
    8 tokens) are not a guarantee: vLLM's logits depend on the batch, so in general some samples differ
    (README: Reproducibility)."""
    from solopo.models import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny-h64", num_layers=2, hidden_size=256)
    rows = synth_rows(5)
    vllm = dict(backend="vllm", dtype="float32", enforce_eager=True, max_model_len=2048, n=3, max_tokens=8)
    local, _ = sample_table(tmp_path, "local", model, rows, **vllm)
    ray, m = sample_table(tmp_path, "ray", model, rows, engine="ray", ray_batch_prompts=2, shard_size=3, **vllm)
    assert m["stats"]["backend"] == "vllm" and m["shards"]["count"] == 2
    assert by_id(ray) == by_id(local)


def test_eval_on_ray_equals_local(tmp_path, tiny_model_dir, local_ray):
    from solopo.stages.evaluate import CompareEvalStage

    def run(name, **engine):
        ov = {
            "run": {"run_dir": str(tmp_path / name), "model": str(tiny_model_dir)},
            "eval": {
                "backend": "transformers",
                "datasets": ["musique"],
                "lengths": [1024],
                "n_questions": 3,
                "max_tokens": 8,
                **engine,
            },
        }
        Pipeline([CompareEvalStage], build_config(overrides=ov)).run()
        return read_parquet(tmp_path / name / "eval" / "data.parquet"), read_json(
            tmp_path / name / "eval" / "manifest.json"
        )

    local, _ = run("local")
    ray, m = run("ray", engine="ray", replicas=2, ray_batch_prompts=1)
    cols = ["model", "dataset", "target_len", "id", "output", "prediction", "sub_em"]
    assert local.num_rows == 3
    assert ray.select(cols).to_pylist() == local.select(cols).to_pylist()
    assert m["stats"]["engine"] == "ray"


# --- resumable: the runner writes streamed shards as they come ---------------------------------------
class Src(Stage):
    name = "src"
    Config = StageConfig
    writes = ("x",)

    def run(self, data):
        return pa.table({"x": list(range(7))})


class Streaming(Stage):
    """Doubles x; all shards at once, yielded last first; a drop and a stat per shard; can die after k."""

    name = "stream"
    Config = StageConfig
    after = "src"
    reads = ("x",)
    writes = ("x",)
    shard_size = 2
    die_after: int | None = None
    handed: list[list[int]] = []

    def streams_shards(self):
        return True

    def run(self, data):
        raise AssertionError("a streaming stage's shards go through run_shards")

    def run_shards(self, parts, scope):
        Streaming.handed.append([i for i, _ in parts])
        for k, (i, part) in enumerate(reversed(parts)):
            if self.die_after is not None and k == self.die_after:
                raise KeyboardInterrupt("killed")
            with scope(i):
                self.ctx.drop("odd_shard" if i % 2 else "even_shard", example=str(i))
                self.ctx.stat("rows", part.num_rows, "sum")
            yield i, pa.table({"x": [2 * v for v in part.column("x").to_pylist()]})


Cfg = create_model(
    "Cfg",
    __config__=ConfigDict(extra="forbid", frozen=True),
    run=(RunSettings, RunSettings()),
    src=(StageConfig, StageConfig()),
    stream=(StageConfig, StageConfig()),
)


def test_streamed_shards_are_written_as_they_finish_and_resume(tmp_path):
    cfg = Cfg(run=RunSettings(run_dir=str(tmp_path / "run")))
    Streaming.handed, Streaming.die_after = [], 2
    with pytest.raises(KeyboardInterrupt):
        Pipeline([Src, Streaming], cfg).run()
    shards = tmp_path / "run" / "stream" / "shards"
    # 4 shards (2+2+2+1 rows), handed over together; the two yielded before the kill are on disk with meta.
    assert Streaming.handed == [[0, 1, 2, 3]]
    assert sorted(p.name for p in shards.glob("part-*.json")) == ["part-00002.json", "part-00003.json"]
    assert read_json(shards / "part-00003.json")["drops"] == {"odd_shard": 1}
    assert read_json(shards / "part-00003.json")["stats"] == {"rows": [1, "sum"]}

    Streaming.die_after = None
    Pipeline([Src, Streaming], cfg).run()
    assert Streaming.handed[-1] == [0, 1]  # only the unfinished shards
    out = read_parquet(tmp_path / "run" / "stream" / "data.parquet").column("x").to_pylist()
    assert out == [2 * v for v in range(7)]  # shard order, whatever the completion order
    m = read_json(tmp_path / "run" / "stream" / "manifest.json")
    assert m["shards"] == {"count": 4, "resumed": 2, "rows_per_shard": 2}
    assert m["drops"] == {"even_shard": 2, "odd_shard": 2} and m["stats"]["rows"] == 7


# --- failures ---------------------------------------------------------------------------------------
FLAKY = textwrap.dedent(
    """
    from pathlib import Path

    from solopo.engines.ray_data import Replica


    class FlakyReplica(Replica):
        # Fails the calls whose number (counted across replicas and retries in a file) is in FAIL.
        COUNTER = ""
        FAIL = ()

        def __call__(self, batch):
            path = Path(self.COUNTER)
            k = int(path.read_text() or 0) + 1 if path.exists() else 1
            path.write_text(str(k))
            if (k > 2) if self.FAIL == "after2" else (k in self.FAIL):
                raise RuntimeError(f"CUDA out of memory (injected, call {k})")
            return super().__call__(batch)
    """
)


@pytest.fixture()
def flaky(tmp_path, monkeypatch, local_ray):
    import importlib

    from ray import cloudpickle

    import solopo.engines.ray_data as rd

    mod_dir = tmp_path / "flakymod"
    mod_dir.mkdir()
    (mod_dir / "flaky_replica.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(mod_dir))
    mod = importlib.import_module("flaky_replica")
    cloudpickle.register_pickle_by_value(mod)  # the replicas do not have this module on their path
    cls = mod.FlakyReplica
    cls.COUNTER = str(tmp_path / "calls")
    monkeypatch.setattr(rd, "Replica", cls)
    yield cls
    cloudpickle.unregister_pickle_by_value(mod)
    sys.modules.pop("flaky_replica", None)


def test_failed_replica_call_is_retried(tmp_path, tiny_model_dir, flaky):
    flaky.FAIL = (1,)
    rows = synth_rows(4)
    common = dict(n=2, max_tokens=6, batch_size=2)
    local, _ = sample_table(tmp_path, "local", tiny_model_dir, rows, **common)
    ray, _ = sample_table(tmp_path, "ray", tiny_model_dir, rows, engine="ray", ray_batch_prompts=2, **common)
    assert by_id(ray) == by_id(local)
    assert int(Path(flaky.COUNTER).read_text()) == 3  # 2 calls + the retried one


def test_replica_that_keeps_failing_fails_the_stage_with_its_error_and_keeps_done_shards(
    tmp_path, tiny_model_dir, flaky
):
    flaky.FAIL = "after2"
    rows = synth_rows(6)
    sample = dict(n=2, max_tokens=6, batch_size=2, engine="ray", replicas=1, ray_batch_prompts=2, shard_size=2)
    sample["ray_max_retries"] = 1
    with pytest.raises(RayEngineError, match=r"RuntimeError: CUDA out of memory \(injected") as e:
        sample_table(tmp_path, "ray", tiny_model_dir, rows, **sample)
    assert "Traceback" not in str(e.value) and len(str(e.value)) < 400
    shards = tmp_path / "ray" / "sample" / "shards"
    # Calls 1-2 succeeded (shards 0-1); Ray may fail the run before the driver has taken the second one.
    kept = len(list(shards.glob("part-*.json")))
    assert kept in (1, 2)

    flaky.FAIL = ()
    table, m = sample_table(tmp_path, "ray", tiny_model_dir, rows, **sample)
    assert table.num_rows == 6 and m["shards"]["resumed"] == kept and m["shards"]["count"] == 3


# --- bad input --------------------------------------------------------------------------------------
def test_more_gpus_than_the_cluster_has_names_what_ray_reports():
    with pytest.raises(RayEngineError, match=r"asks for 8 GPUs; Ray reports 4 GPU\(s\) and 32 CPU\(s\) on 1 node"):
        check_resources(RayLayout(replicas=4, tensor_parallel_size=2), {"GPU": 4.0, "CPU": 32.0}, 1)
    assert check_resources(RayLayout(replicas=2, tensor_parallel_size=2), {"GPU": 4.0, "CPU": 32.0}, 1) is True
    assert check_resources(RayLayout(replicas=2), {"CPU": 2.0}, 1) is False
    with pytest.raises(RayEngineError, match="tensor_parallel_size=2 needs GPUs"):
        check_resources(RayLayout(tensor_parallel_size=2), {"CPU": 2.0}, 1)


def test_too_many_cpu_replicas_on_the_local_ray(tmp_path, tiny_model_dir, local_ray):
    with pytest.raises(RayEngineError, match=r"asks for 3 CPUs .*Ray reports 0 GPU\(s\) and 2 CPU\(s\) on 1 node"):
        sample_table(tmp_path, "r", tiny_model_dir, synth_rows(2), engine="ray", replicas=3)


@pytest.mark.parametrize(
    "address, found, message",
    [
        ("127.0.0.1:1", None, "no Ray cluster reachable at ray_address '127.0.0.1:1' ("),
        ("auto", None, "ray_address 'auto' found no Ray cluster"),
        ("auto", "127.0.0.1:1", "at ray_address '127.0.0.1:1' (what ray_address 'auto' resolved to)"),
        ("nohost", None, "is not host:port"),
    ],
)
def test_bad_ray_address_fails_with_a_message(address, found, message):
    pytest.importorskip("ray")
    # A fresh process where Ray's discovery of running clusters sees none (the machine may run others' Rays),
    # or a stale record of one (found).
    code = textwrap.dedent(
        f"""
        import ray._private.services as s
        s.find_gcs_addresses = lambda: []
        s.find_bootstrap_address = lambda temp_dir: {found!r}
        from solopo.engines.ray_data import connect
        connect({address!r})
        """
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "RAY_ADDRESS": ""}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0
    assert message in p.stderr and "RayEngineError" in p.stderr


def test_missing_ray_names_the_extra(monkeypatch):
    from solopo.engines.ray_data import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "solopo\[ray\]"'):
        import_ray()


def test_engine_config_is_validated():
    from solopo.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="engine"):
        build_config(overrides={"sample": {"engine": "spark"}})
    with pytest.raises(ConfigError, match="replicas"):
        build_config(overrides={"eval": {"replicas": 0}})
    cfg = build_config(overrides={"sample": {"engine": "ray", "ray_address": "auto", "replicas": 8}})
    assert (cfg.sample.engine, cfg.sample.ray_address, cfg.sample.replicas) == ("ray", "auto", 8)


def test_a_slow_cluster_says_what_it_waits_for(monkeypatch, caplog):
    """Issue 21 (note): an address that answers slowly took 22 s in silence; after SLOW_CONNECT_NOTICE_S the log
    says "trying to reach ..." (Ray's own init replaced by a slow stand-in)."""
    import logging
    import time
    import types

    from solopo.engines import ray_data

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: time.sleep(0.5))
    monkeypatch.setattr(ray_data, "import_ray", lambda: fake)
    monkeypatch.setattr(ray_data, "_check_reachable", lambda *a, **k: None)
    monkeypatch.setattr(ray_data, "SLOW_CONNECT_NOTICE_S", 0.05)
    with caplog.at_level(logging.INFO, logger="solopo"):
        assert ray_data.connect("10.0.0.1:6379") is True
    assert "trying to reach 10.0.0.1:6379 (ray_address '10.0.0.1:6379') ..." in caplog.text
    caplog.clear()
    fake.init = lambda **kw: None  # a quick answer: no notice
    with caplog.at_level(logging.INFO, logger="solopo"):
        ray_data.connect("10.0.0.1:6379")
        time.sleep(0.1)
    assert "trying to reach" not in caplog.text
