"""On a CUDA device (marker `gpu`; skipped without one): the real `solopo train` CLI under DeepSpeed ZeRO-3 in bf16,
transformers-backend sampling, and log-probs that agree between attention implementations (sdpa with no dense
mask / segment attention vs eager with the dense mask). Run by scripts/gpu_check.sh."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]
REPO = Path(__file__).resolve().parents[1]


def test_cli_train_zero3_bf16(tmp_path, tiny_model_dir):
    """`solopo train` on triplets written as the export stage would (no sampler, no weights), ZeRO-3, bf16, CUDA:
    finite losses, and the gathered model loads with transformers."""
    pytest.importorskip("deepspeed")
    from test_train import write_export_chain
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={tiny_model_dir}"]
    write_export_chain(run_dir, common)
    sets = [
        *common,
        "train.max_steps=3",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "train.lr=1e-4",
        "train.deepspeed=zero3",
        "train.dtype=bf16",
        "train.attn=sdpa",
        "train.shared_prefix=true",
    ]
    cmd = [sys.executable, "-m", "solopo.cli", "train", "--algo", "orpo"] + [x for s in sets for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cuda" in proc.stderr and "deepspeed zero3" in proc.stderr
    model_dir = run_dir / "train" / "models" / "orpo-solo"
    logs = [json.loads(x) for x in (model_dir / "logs.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logs)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    assert all(torch.isfinite(p).all() for p in lm.parameters())


def test_deepspeed_auto_on_one_gpu_is_plain(tmp_path, tiny_model_dir):
    """train.deepspeed=auto on one GPU with a model that fits: no ZeRO, and the choice recorded."""
    from test_train import run

    r = run(tmp_path, tiny_model_dir, algo="simpo", deepspeed="auto", max_steps=1, dtype="bf16")
    assert r["deepspeed"] == "none"
    assert any("train.deepspeed=auto -> none" in n for n in r["notes"])


def test_transformers_sampling_on_cuda(tiny_model_dir):
    from solopo.backends import TransformersBackend

    be = TransformersBackend(str(tiny_model_dir), dtype="bfloat16")
    assert be.device.startswith("cuda")
    out = be.generate(
        ["Question: where is Lyon?", "Question: what is 2+2?"], n=4, temperature=1.0, top_p=1.0, max_tokens=16, seed=0
    )
    assert [len(g) for g in out] == [4, 4]
    assert all(0 < x.num_tokens <= 16 for g in out for x in g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logps_sdpa_vs_eager(tiny_model_dir, tokenizer, dtype):
    """solo (padded pair + long) and shared-prefix log-probs: sdpa without masks / segment attention (flash or
    memory-efficient kernels on CUDA) == eager with the dense masks."""
    import pyarrow as pa
    from test_train import export_rows
    from transformers import AutoModelForCausalLM

    from solopo.training.data import build_examples
    from solopo.training.logprobs import CompletionLogps, use_segment_attention
    from solopo.training.loop.step import micro_batch_logps

    ex, _ = build_examples(pa.Table.from_pylist(export_rows(4)), tokenizer, "solo", True, "x")
    dev = torch.device("cuda")
    res = {}
    for attn in ("eager", "sdpa"):
        lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation=attn).to(dev)
        if attn == "sdpa":
            assert use_segment_attention(lm)
        m = CompletionLogps(lm, chunk_size=16).eval()
        with torch.no_grad():
            for shared in (False, True):
                b, _ = micro_batch_logps(m, ex, 2, True, True, dev, shared_prefix=shared)
                res[attn, shared] = torch.stack([b.chosen.total, b.rejected.total, b.nll_w.total, b.long_w.total])
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 0.5}
    for shared in (False, True):
        torch.testing.assert_close(res["sdpa", shared], res["eager", shared], **tol)
    torch.testing.assert_close(res["sdpa", True][:3], res["sdpa", False][:3], **tol)  # packed == padded
