"""Sample stage mechanics: backends, dedupe across lengths, sharding, resume after a killed shard,
progress bar, manifest, context-length guard. Real generation uses the tiny random model."""

from __future__ import annotations

import importlib.util

import pyarrow as pa
import pytest

import solopo.backends as backends
from solopo.api import build_config
from solopo.backends import Generation, TransformersBackend, get_backend
from solopo.pipeline.errors import DataError, MissingDependencyError
from solopo.pipeline.io import read_json, read_parquet, write_parquet
from solopo.pipeline.runner import Pipeline
from solopo.prompts import render_document, render_prompt
from solopo.stages.sample import SAMPLE_SCHEMA, SampleStage, question_seed


def synth_rows(n: int, lengths=(8192,), long_words: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        q = f"Where was person {i} born?"
        gold = render_document(1, f"Person {i}", f"Person {i} was born in City{i}.")
        filler = [render_document(k, f"Filler {k}", " ".join(f"w{k}_{j}" for j in range(long_words))) for k in (2, 3)]
        for tl in lengths:
            rows.append(
                {
                    "id": f"q{i}",
                    "question": q,
                    "answers": [f"City{i}"],
                    "short_prompt": render_prompt([gold], q),
                    "long_prompt": render_prompt([gold, *filler], q) + f" [{tl}]",
                    "short_tokens": 50,
                    "long_tokens": 120,
                    "target_len": tl,
                    "gold_positions": [0],
                    "n_docs": 3,
                    "rho": 0.4,
                    "dataset": "musique",
                }
            )
    return rows


def write_synth(run_dir, rows):
    d = run_dir / "synth"
    write_parquet(pa.Table.from_pylist(rows), d / "data.parquet")
    (d / "_SUCCESS").write_text("fake-synth-key\n")


def config(run_dir, model_dir, **sample):
    sample = {"backend": "transformers", "n": 2, "max_tokens": 6, "temperature": 0.85, **sample}
    return build_config(overrides={"run": {"run_dir": str(run_dir), "model": str(model_dir)}, "sample": sample})


class FakeBackend:
    """Deterministic text per (prompt, seed): enough to test the stage without a model."""

    name = "fake"

    def __init__(self, max_context=None):
        self.calls: list[list[str]] = []
        self.max_context = max_context
        self.fail_on_call: int | None = None

    def prompt_lengths(self, prompts):
        return [len(p.split()) for p in prompts]

    def generate(self, prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        self.calls.append(list(prompts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        seeds = list(seed) if not isinstance(seed, int) else [seed] * len(prompts)
        out = [
            [Generation(f"sample {j} seed {s}\nThe answer is: x", "stop" if j else "length", 3 + j) for j in range(n)]
            for s in seeds
        ]
        if progress:
            progress(len(prompts), sum(g.num_tokens for gs in out for g in gs))
        return out

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    fb = FakeBackend()
    monkeypatch.setattr(backends, "get_backend", lambda *a, **k: fb)
    return fb


def test_dedupes_questions_across_lengths(tmp_path, tiny_model_dir, fake):
    write_synth(tmp_path, synth_rows(3, lengths=(4096, 8192)))
    Pipeline([SampleStage], config(tmp_path, tiny_model_dir, shard_size=100)).run()
    out = read_parquet(tmp_path / "sample" / "data.parquet")
    assert out.schema.equals(SAMPLE_SCHEMA)
    assert out.column("id").to_pylist() == ["q0", "q1", "q2"]
    assert sum(len(c) for c in fake.calls) == 3  # the short prompt is sampled once per question
    r = out.to_pylist()[0]
    assert r["samples"][0] == f"sample 0 seed {question_seed(0, 'q0')}\nThe answer is: x"
    assert r["finish_reasons"] == ["length", "stop"] and r["sample_tokens"] == [3, 4]
    assert r["backend"] == "fake" and r["long_samples"] == [] and r["answers"] == ["City0"]


def test_on_both_samples_every_long_prompt(tmp_path, tiny_model_dir, fake):
    write_synth(tmp_path, synth_rows(2, lengths=(4096, 8192)))
    Pipeline([SampleStage], config(tmp_path, tiny_model_dir, on="both")).run()
    out = read_parquet(tmp_path / "sample" / "data.parquet").to_pylist()
    assert sum(len(c) for c in fake.calls) == 2 + 4
    assert [e["target_len"] for e in out[0]["long_samples"]] == [4096, 8192]
    assert len(out[0]["long_samples"][1]["samples"]) == 2
    # long samples use their own seeds, not the short prompt's
    assert out[0]["long_samples"][0]["samples"] != out[0]["samples"]


def test_resume_after_killed_shard(tmp_path, tiny_model_dir, fake, capsys):
    write_synth(tmp_path, synth_rows(10))
    cfg = config(tmp_path, tiny_model_dir, shard_size=1)
    fake.fail_on_call = 4  # dies while sampling shard 4 of 10
    with pytest.raises(KeyboardInterrupt):
        Pipeline([SampleStage], cfg).run()
    shards = tmp_path / "sample" / "shards"
    assert len(list(shards.glob("part-*.json"))) == 3
    assert not (tmp_path / "sample" / "_SUCCESS").exists()

    fake.calls.clear()
    fake.fail_on_call = None
    capsys.readouterr()
    Pipeline([SampleStage], cfg).run()
    assert "10/10" in capsys.readouterr().err  # the stage's one bar starts at the 3 resumed prompts
    assert [c[0].split("Question: ")[1] for c in fake.calls] == [f"Where was person {i} born?" for i in range(3, 10)]
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["shards"] == {"count": 10, "resumed": 3, "rows_per_shard": 1}
    assert m["stats"]["questions"] == 10 and m["stats"]["short_samples"] == 20
    resumed = read_parquet(tmp_path / "sample" / "data.parquet")

    # identical to an uninterrupted run: seeds depend on the question, not on when it ran
    clean = tmp_path / "clean"
    write_synth(clean, synth_rows(10))
    Pipeline([SampleStage], config(clean, tiny_model_dir, shard_size=1)).run()
    assert read_parquet(clean / "sample" / "data.parquet").equals(resumed)

    # a third run is a no-op
    fake.calls.clear()
    summary = Pipeline([SampleStage], cfg).run()
    assert summary["sample"]["status"] == "cached" and fake.calls == []


def test_prompts_over_context_are_dropped(tmp_path, tiny_model_dir, monkeypatch):
    fb = FakeBackend(max_context=90)
    monkeypatch.setattr(backends, "get_backend", lambda *a, **k: fb)
    rows = synth_rows(3, long_words=5)
    rows[1]["short_prompt"] += " pad" * 60  # q1's short prompt leaves no room for max_tokens
    write_synth(tmp_path, rows)
    Pipeline([SampleStage], config(tmp_path, tiny_model_dir, max_tokens=20)).run()
    out = read_parquet(tmp_path / "sample" / "data.parquet")
    assert out.column("id").to_pylist() == ["q0", "q2"]
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["drops"] == {"prompt_exceeds_context": 1}
    assert m["drop_examples"] == {"prompt_exceeds_context": ["q1"]}
    assert any("skipped" in n for n in m["notes"])


def test_inconsistent_short_prompts_are_a_data_error(tmp_path, tiny_model_dir, fake):
    rows = synth_rows(1, lengths=(4096, 8192))
    rows[1]["short_prompt"] += " changed"
    write_synth(tmp_path, rows)
    with pytest.raises(DataError, match="short prompt"):
        Pipeline([SampleStage], config(tmp_path, tiny_model_dir)).run()


def test_tiny_model_sampling_manifest_and_progress(tmp_path, tiny_model_dir, capsys):
    write_synth(tmp_path, synth_rows(5))
    cfg = config(tmp_path, tiny_model_dir, shard_size=2, n=3, max_tokens=5, batch_size=6)
    Pipeline([SampleStage], cfg).run()
    out = read_parquet(tmp_path / "sample" / "data.parquet").to_pylist()
    assert len(out) == 5
    for r in out:
        assert len(r["samples"]) == len(r["finish_reasons"]) == len(r["sample_tokens"]) == 3
        assert all(1 <= t <= 5 for t in r["sample_tokens"])
        assert all(f in ("stop", "length") for f in r["finish_reasons"])
        # "length" exactly when the cap was hit without an EOS
        assert all(
            (f == "length") == (t == 5 and f != "stop")
            for f, t in zip(r["finish_reasons"], r["sample_tokens"], strict=True)
        )
        assert r["backend"] == "transformers" and r["prompt_tokens"] > 20
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["shards"]["count"] == 3
    assert m["stats"]["backend"] == "transformers"
    assert m["stats"]["questions"] == 5
    assert m["stats"]["generated_tokens"] == sum(sum(r["sample_tokens"]) for r in out)
    assert m["stats"]["tokens_per_second"] > 0
    assert any("n=3" in n and "paper: n=32" in n for n in m["notes"])  # the reduction is announced
    err = capsys.readouterr().err
    assert "sample[transformers]" in err and "tok/s" in err
    # One bar for the stage's 3 shards (issue 26.2: it restarted per shard, 2/2, 2/2, 1/1, with no overall ETA).
    assert "5/5" in err and "2/2" not in err and "1/1" not in err


def test_transformers_backend_seeded_and_greedy(tiny_model_dir):
    b = TransformersBackend(str(tiny_model_dir), batch_size=8)
    prompts = ["Question: where?", "Another, longer question about a place?"]
    a = b.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=[1, 2])
    again = b.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=[1, 2])
    assert a == again
    g = b.generate(prompts[:1], n=3, temperature=0.0, top_p=1.0, max_tokens=6, seed=0)
    assert len(g) == 1 and len({x.text for x in g[0]}) == 1  # greedy: identical samples
    # left padding: a prompt's greedy output does not depend on its batch neighbour
    alone = b.generate(prompts[1:], n=1, temperature=0.0, top_p=1.0, max_tokens=6, seed=0)
    both = b.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=6, seed=0)
    assert alone[0][0].text == both[1][0].text


def test_auto_backend_is_announced(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(backends, "vllm_available", lambda: False)
    notes: list[str] = []
    b = get_backend("auto", str(tiny_model_dir), ctx_note=notes.append, tensor_parallel_size=2)
    assert b.name == "transformers"
    assert notes and "auto -> transformers" in notes[0] and "vllm is not installed" in notes[0]


def test_vllm_requested_but_missing_names_install_command(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(backends, "vllm_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="pip install vllm"):
        get_backend("vllm", str(tiny_model_dir))


def test_cpu_demo_preset_reduces_sampling():
    cfg = build_config(preset="cpu-demo")
    assert (cfg.sample.n, cfg.sample.max_tokens) == (8, 128)
    default = build_config()
    assert (default.sample.n, default.sample.temperature) == (32, 0.85)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_auto_picks_transformers_without_vllm(tmp_path, tiny_model_dir):
    write_synth(tmp_path, synth_rows(1))
    Pipeline([SampleStage], config(tmp_path, tiny_model_dir, backend="auto", n=1, max_tokens=2)).run()
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["fingerprint"]["backend"] == "transformers"
    assert any("backend auto -> transformers" in n for n in m["notes"])


PROMPTS = [
    "Question: where is it?",
    "Another, much longer question about a place and a year?",
    "A third one: who wrote it, and when?",
]


def test_shared_prefill_matches_batched_prefill(tiny_model_dir):
    """The CPU path (prefill each prompt once, repeat its KV cache n times) and the GPU path (prompts x n rows
    prefilled by generate) draw the same samples: same logits (fp32) and the same per-row random streams."""
    kw = dict(n=3, temperature=1.0, top_p=0.9, max_tokens=8, seed=[5, 6, 7])
    shared = TransformersBackend(str(tiny_model_dir), batch_size=9, prefill="shared", dtype="float32")
    batched = TransformersBackend(str(tiny_model_dir), batch_size=9, prefill="batched", dtype="float32")
    assert (shared.settings["prefill"], batched.settings["prefill"]) == ("shared", "batched")
    a, b = shared.generate(PROMPTS, **kw), batched.generate(PROMPTS, **kw)
    assert a == b
    assert len({g.text for g in a[1]}) > 1  # sampled, not greedy copies


def test_samples_do_not_depend_on_batching(tiny_model_dir):
    """Issue 8.3: a prompt's samples depend on its seed only: alone, inside a batch, at any batch size."""
    kw = dict(n=3, temperature=0.85, top_p=1.0, max_tokens=8)
    big = TransformersBackend(str(tiny_model_dir), batch_size=9, dtype="float32")  # 3 prompts per call
    small = TransformersBackend(str(tiny_model_dir), batch_size=3, dtype="float32")  # 1 prompt per call
    together = big.generate(PROMPTS, seed=[11, 12, 13], **kw)
    assert small.generate(PROMPTS, seed=[11, 12, 13], **kw) == together
    for i, p in enumerate(PROMPTS):
        assert big.generate([p], seed=[11 + i], **kw) == [together[i]]
    # reordered neighbours, same seeds per prompt
    rev = big.generate(PROMPTS[::-1], seed=[13, 12, 11], **kw)
    assert rev[::-1] == together
    # another seed, other samples
    assert big.generate(PROMPTS[:1], seed=[99], **kw) != [together[0]]


def test_stage_samples_do_not_depend_on_shard_size(tmp_path, tiny_model_dir):
    def run(d, shard_size, batch_size):
        write_synth(d, synth_rows(4))
        Pipeline(
            [SampleStage],
            config(d, tiny_model_dir, shard_size=shard_size, batch_size=batch_size, n=2, max_tokens=5, dtype="float32"),
        ).run()
        return read_parquet(d / "sample" / "data.parquet").column("samples").to_pylist()

    assert run(tmp_path / "a", 1, 2) == run(tmp_path / "b", 4, 8)


def test_seeded_sampler_draws_from_the_softmax():
    """Hand-worked: logits log([0.5, 0.3, 0.2, 0]) -> frequencies 0.5/0.3/0.2/0 over many independent rows."""
    import math

    import torch

    from solopo.backends.hf import _SeededSampler, sample_key

    rows = 20000
    scores = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2), -math.inf]]).repeat(rows, 1)
    sampler = _SeededSampler([sample_key(3, j) for j in range(rows)], prompt_width=4, device="cpu")
    out = sampler(torch.zeros((rows, 4), dtype=torch.long), scores)
    assert ((out == 0).sum(-1) == 1).all() and ((out == 0) | (out == -math.inf)).all()  # one token per row
    picks = out.argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / rows
    # binomial sd at p=0.5, n=20000 is 0.0035: 4 sd
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015), freq
    # the next decode step draws a fresh uniform for the same row
    step1 = sampler(torch.zeros((rows, 5), dtype=torch.long), scores).argmax(-1)
    assert (step1 != picks).float().mean() > 0.3


def test_uniforms_stay_below_one_and_edges_never_pick_a_zero():
    """Issue 22.1: the old float32 uniform (k + 0.5) / 2^24 rounded to 1.0 at k = 2^24 - 1 (Gumbel noise +inf).
    The largest uniform now is (2^52 - 1) / 2^52 < 1; u = 0 and u -> 1 pick the first and last tokens of
    nonzero probability, never the zeros around them."""
    import torch

    from solopo.backends.hf import inverse_cdf

    assert torch.tensor(float((1 << 24) - 1) + 0.5, dtype=torch.float32) / float(1 << 24) == 1.0  # the old bug
    top = torch.tensor((1 << 52) - 1, dtype=torch.long).to(torch.float64) / float(1 << 52)
    assert top < 1.0
    p = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0], dtype=torch.float64)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999, float(top)], dtype=torch.float64)
    assert inverse_cdf(p, u).tolist() == [1, 1, 3, 3, 3]
    # a cdf whose total rounds below the target: the last nonzero token, not the index past the end
    assert inverse_cdf(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), torch.tensor([1.0])).tolist() == [1]


@pytest.fixture(scope="module")
def real_logits():
    """Next-token logits (49,152-token vocabulary) of the embedded SmolLM2-135M-Instruct at 4 positions of a
    chain-of-thought answer, the first token of the answer among them: bench/sample/bench_sampler.py's, shared."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "sample" / "bench_sampler.py"
    spec = importlib.util.spec_from_file_location("bench_sampler", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logits = bench.answer_logits()
    assert logits.shape == (4, 49152)
    return logits


def _chi2_two_sample(a, b) -> float:
    """p-value of the chi-square test that two count vectors come from one distribution (bins with fewer than 10
    counts in total pooled into one)."""
    import numpy as np
    from scipy.stats import chi2_contingency

    a, b = np.asarray(a), np.asarray(b)
    big = (a + b) >= 10
    table = np.stack([np.append(a[big], a[~big].sum()), np.append(b[big], b[~big].sum())])
    table = table[:, table.sum(0) > 0]
    return float(chi2_contingency(table)[1])


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_sampler_on_the_real_vocabulary_vs_multinomial(real_logits, top_p):
    """Issue 22.1 on the real 49K vocabulary at T = 0.85: 4 x 256 draws through the logits processors as generate
    runs them (temperature, top-p, sampler), then 4 x 25,000 draws of the sampler's own uniforms (keys x decode
    steps) through the same inverse_cdf: no token of probability 0 is ever drawn, and the counts match
    torch.multinomial's (chi-square, p > 1e-4) and the probabilities themselves."""
    import numpy as np
    import torch
    from scipy.stats import chisquare
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from solopo.backends.hf import _SeededSampler, inverse_cdf, sample_key

    procs = [TemperatureLogitsWarper(0.85)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    rows_per = 256
    for r, logits in enumerate(real_logits):
        scores = logits[None].repeat(rows_per, 1)
        for proc in procs:
            scores = proc(None, scores)
        p = torch.softmax(scores[0], -1, dtype=torch.float64)
        allowed = p > 0
        if top_p < 1:
            assert 0 < int(allowed.sum()) < 49152  # the filter removed tokens: the case that used to fail
        sampler = _SeededSampler([sample_key(r, j) for j in range(rows_per)], prompt_width=1, device="cpu")
        picks = sampler(torch.zeros((rows_per, 1), dtype=torch.long), scores).argmax(-1)
        assert allowed[picks].all()

        # The bulk: 25,000 draws = 1,000 rows x 25 decode steps of the sampler's uniform stream.
        keys = _SeededSampler([sample_key(100 + r, j) for j in range(1000)], prompt_width=0, device="cpu")
        u = torch.cat([keys.uniforms(step) for step in range(25)])
        ours = inverse_cdf(p, u)
        assert allowed[ours].all(), f"drew {int((~allowed[ours]).sum())} filtered token(s)"
        gen = torch.Generator().manual_seed(r)
        ref = torch.multinomial(p.float(), len(u), replacement=True, generator=gen)
        a = torch.bincount(ours, minlength=p.numel()).numpy()
        b = torch.bincount(ref, minlength=p.numel()).numpy()
        assert _chi2_two_sample(a, b) > 1e-4
        # goodness of fit against the probabilities (tokens expected fewer than 10 times pooled)
        exp = p.numpy() * len(u)
        big = exp >= 10
        obs = np.append(a[big], a[~big].sum())
        want = np.append(exp[big], exp[~big].sum())
        assert chisquare(obs[want > 0], want[want > 0] * obs.sum() / want.sum()).pvalue > 1e-4


def test_threads_knob_and_settings_in_manifest(tmp_path, tiny_model_dir):
    import torch

    # An in-process vLLM engine that ran earlier in this pytest process (test_ray, test_vllm, run-all with
    # VLLM_ENABLE_V1_MULTIPROCESSING=0) replaces torch.set_num_threads with a no-op for the rest of the process;
    # the manifest must then record the count in effect, not the one asked for.
    settable = getattr(torch.set_num_threads, "__name__", "") != "skip_set_num_threads"
    before = torch.get_num_threads()
    try:
        write_synth(tmp_path, synth_rows(1))
        Pipeline([SampleStage], config(tmp_path, tiny_model_dir, n=1, max_tokens=2, threads=1)).run()
        in_effect = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert in_effect == 1 or not settable
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["stats"]["backend_threads"] == in_effect and m["stats"]["backend_prefill"] == "shared"
    assert any(f"transformers backend: device=cpu, prefill=shared, threads={in_effect}" in n for n in m["notes"])


def test_physical_cores_and_vllm_cpu_env(monkeypatch):
    from solopo import hardware

    assert 1 <= hardware.physical_cores() <= len(hardware.usable_cpus())
    assert hardware._cpu_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for k in hardware.VLLM_CPU_ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # what the user exported wins
    env = hardware.vllm_cpu_env(threads=1)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(hardware.usable_cpus()[0])
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


WATCHED = """
import subprocess, sys, time
from solopo.hardware import stop_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
dog = stop_with_parent({child.pid})
print(child.pid, dog.pid, flush=True)
time.sleep(300)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_watchdog_stops_children_when_the_parent_is_killed(tmp_path):
    """Issue 21.10, the mechanism the vLLM backend uses for its engine core (tests/test_vllm.py runs it on a
    real engine): after kill -9 of the parent, the watched process is stopped; the watchdog then exits."""
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", WATCHED], stdout=subprocess.PIPE, text=True)
    child, dog = map(int, parent.stdout.readline().split())
    assert _running(child) and _running(dog)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and (_running(child) or _running(dog)):
        time.sleep(0.2)
    assert not _running(child) and not _running(dog)


def test_watchdog_exits_when_the_watched_process_ends_first():
    import subprocess
    import sys

    from solopo.hardware import stop_with_parent

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    dog = stop_with_parent({child.pid})
    child.wait()  # reaped: the pid is gone
    assert dog is not None and dog.wait(timeout=20) == 0


def test_vllm_dtype_is_explicit(tiny_model_dir, monkeypatch):
    """Issue 26.1/22.3: vLLM gets a dtype, never "auto": reproducible -> fp32; an fp32 checkpoint -> bf16 where
    the device has bf16 units (vLLM's own choice), else fp32; an explicit dtype wins."""
    from solopo import hardware
    from solopo.backends.vllm_engine import resolve_vllm_dtype

    path = str(tiny_model_dir)  # saved in float32
    assert resolve_vllm_dtype("auto", path, on_cpu=True, trust_remote_code=False, reproducible=True) == "float32"
    assert resolve_vllm_dtype("float16", path, True, False, True) == "float16"
    assert resolve_vllm_dtype("auto", path, on_cpu=False, trust_remote_code=False, reproducible=False) == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert resolve_vllm_dtype("auto", path, on_cpu=True, trust_remote_code=False, reproducible=False) == "float32"


def test_reproducible_transformers_runs_fp32_and_records_it(tmp_path, tiny_model_dir):
    write_synth(tmp_path, synth_rows(1))
    Pipeline([SampleStage], config(tmp_path, tiny_model_dir, n=1, max_tokens=2, reproducible=True)).run()
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["stats"]["dtype"] == "float32" and m["stats"]["reproducible"] is True
    assert "vllm_log" not in m["stats"]


def test_all_empty_samples_fail_and_some_warn(tmp_path, tiny_model_dir, monkeypatch):
    """Issue 21.9: a model whose logits are NaN samples empty strings; a shard with nothing else stops the stage
    (exit 2 through the CLI), a few are counted in the manifest and the log."""
    from solopo.pipeline.errors import SolopoError

    fb = FakeBackend()
    real = fb.generate

    def empty(prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        return [[Generation("", "stop", 1, finite=False) for _ in range(n)] for _ in prompts]

    fb.generate = empty
    monkeypatch.setattr(backends, "get_backend", lambda *a, **k: fb)
    write_synth(tmp_path, synth_rows(2))
    with pytest.raises(SolopoError, match=r"all 4 samples .*\(4 of them met NaN/inf logits"):
        Pipeline([SampleStage], config(tmp_path, tiny_model_dir)).run()

    def some(prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        out = real(prompts, n, temperature, top_p, max_tokens, seed, progress)
        out[0][0] = Generation("", "stop", 1)
        return out

    fb.generate = some
    Pipeline([SampleStage], config(tmp_path, tiny_model_dir)).run()
    m = read_json(tmp_path / "sample" / "manifest.json")
    assert m["stats"]["empty_samples"] == 1 and m["stats"]["nonfinite_logit_samples"] == 0
    assert "1 of 4 samples are empty (they select no pair)" in m["notes"]


def test_nan_logits_are_flagged_by_the_transformers_backend(tiny_model_dir):
    """A checkpoint with NaN weights: every sample is flagged non-finite (greedy and sampled)."""
    import torch

    b = TransformersBackend(str(tiny_model_dir), dtype="float32")
    with torch.no_grad():
        b.model.model.norm.weight.fill_(float("nan"))
    for temperature in (0.0, 0.9):
        out = b.generate(PROMPTS[:2], n=2, temperature=temperature, top_p=1.0, max_tokens=3, seed=[1, 2])
        assert all(not g.finite for gens in out for g in gens)


def test_engine_death_quotes_the_workers_error(tmp_path):
    """Issue 21.6: with vLLM's engine in its own process, its main process says only "Engine core initialization
    failed. See root cause above"; the cause is the worker's line in the engine log (these lines are from a real
    log of a model dir without weights; tests/test_vllm.py starts the real engine in-process)."""
    from solopo.backends.vllm_engine import root_cause

    log = tmp_path / "vllm.log"
    log.write_text(
        "(Worker pid=26039) ERROR 12-03 13:11:31 [multiproc_executor.py:953]     raise RuntimeError(\n"
        "(Worker pid=26039) ERROR 12-03 13:11:31 [multiproc_executor.py:953] RuntimeError: Cannot find any model "
        "weights with `/m/no-weights`\n"
        "(EngineCore pid=26026) INFO 12-03 13:11:31 [multiproc_executor.py:479] [shutdown] Executor: waiting\n"
        "(EngineCore pid=26026) ERROR 12-03 13:11:33 [core.py:1510] Exception: WorkerProc initialization failed "
        "due to an exception in a background process. See stack trace for root cause.\n"
        "Process EngineCore:\n"
        "Exception: WorkerProc initialization failed due to an exception in a background process. See stack trace "
        "for root cause.\n"
    )
    exc = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")
    assert root_cause(log, exc) == "RuntimeError: Cannot find any model weights with `/m/no-weights`"
    assert root_cause(None, exc).startswith("RuntimeError: Engine core initialization failed")  # no log: its own
