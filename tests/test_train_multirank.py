"""Multi-rank safety, run for real: `solopo train` with train.num_processes=2 launches two CPU ranks through the
deepspeed launcher (gloo) under ZeRO-3. The ranks hold examples whose completions need different numbers of
LM-head chunks (logps_chunk=4), which hangs ZeRO-3's parameter gathers unless the chunk count is agreed across
ranks; the DPO reference log-probs are split across the ranks and gathered. The same through `accelerate launch`
without DeepSpeed (plain data parallel: gradients averaged across ranks). Losses, gradient norms and final weights
must equal one process running the same global batches."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_train import REPO, export_rows, run, weights, write_export_chain

from solopo.training.data import build_examples
from solopo.training.logprobs import chunked_token_logps
from solopo.training.loop.distributed import rank_shard


def test_padding_chunks_keep_values_and_call_the_head_in_backward_too():
    """Empty padding chunks change no value, and the head runs (and is recomputed in backward) once per chunk."""
    calls: list[int] = []

    class Head(torch.nn.Linear):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    torch.manual_seed(0)
    head = Head(8, 50, bias=False)
    h = torch.randn(5, 8, requires_grad=True)
    y = torch.randint(0, 50, (5,))
    plain = chunked_token_logps(head, h, y, chunk_size=4)
    assert calls == [4, 1]
    calls.clear()
    padded = chunked_token_logps(head, h, y, chunk_size=4, min_chunks=4)
    assert calls == [4, 1, 0, 0]
    torch.testing.assert_close(plain, padded)
    calls.clear()
    padded.sum().backward()
    assert sorted(calls) == [0, 0, 1, 4]  # every chunk, empty ones included, recomputed: same gathers on every rank


def test_rank_shard_is_equal_sized_and_covers_everything():
    for n in (1, 2, 3, 4, 7):
        for world in (1, 2, 3):
            shards = [rank_shard(n, r, world) for r in range(world)]
            assert {len(s) for s in shards} == {math.ceil(n / world)}
            assert set().union(*map(set, shards)) == set(range(n))


@pytest.mark.parametrize(
    "launcher,deepspeed,algo",
    [("deepspeed", "zero3", "dpo"), ("accelerate", "none", "orpo")],
    ids=["deepspeed-zero3-dpo", "accelerate-ddp-orpo"],
)
def test_two_ranks_match_one_process(tmp_path, tiny_model_dir, tokenizer, launcher, deepspeed, algo):
    if deepspeed != "none":
        pytest.importorskip("deepspeed")
    # Precondition: rank 0's and rank 1's first forwards (examples 0 and 1) need different LM-head chunk counts.
    examples, _ = build_examples(pa.Table.from_pylist(export_rows()), tokenizer, "solo", True, "x")
    chunks = [math.ceil((len(e.chosen.completion) + len(e.rejected.completion)) / 4) for e in examples[:2]]
    assert chunks[0] != chunks[1], chunks

    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={tiny_model_dir}", "run.seed=0"]
    write_export_chain(run_dir, common)
    sets = [
        *common,
        "train.num_processes=2",
        f"train.launcher={launcher}",
        f"train.deepspeed={deepspeed}",
        "train.max_steps=2",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "train.logps_chunk=4",
        "train.lr=1e-3",
        "train.gradient_checkpointing=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "solopo.cli", "train", "--algo", algo] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"launching 2 process(es): {launcher}" in log and "on cpu x2" in log and f"deepspeed {deepspeed}" in log
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["stats"]["world_size"] == 2 and manifest["stats"]["launcher"] == launcher

    # one process over the same global batches (2 examples per step) gives the same losses and weights
    model_dir = run_dir / "train" / "models" / f"{algo}-solo"
    ranks = [json.loads(x) for x in (model_dir / "logs.jsonl").read_text().splitlines()]
    one = run(
        tmp_path / "one",
        tiny_model_dir,
        algo=algo,
        max_steps=2,
        micro_batch_size=1,
        grad_accum=2,
        warmup_ratio=0.1,
        lr_scheduler="cosine",
        max_grad_norm=1.0,
    )
    single = [json.loads(x) for x in (Path(one["model_path"]) / "logs.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ranks] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert [r["grad_norm"] for r in ranks] == pytest.approx([r["grad_norm"] for r in single], rel=1e-3)
    assert [r["rewards/accuracies"] for r in ranks] == [r["rewards/accuracies"] for r in single]
    w2, w1 = weights(model_dir), weights(one["model_path"])  # rank 0 saved (ZeRO-3: gathered from the shards)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-5)

    if algo == "dpo":  # the reference was split across the ranks, gathered, and written once with every example
        cache = list((run_dir / "train" / "ref_logps").glob("*.parquet"))
        ref_two = {r["id"]: r for r in pq.read_table(cache[0]).to_pylist()}
        assert len(cache) == 1 and sorted(ref_two) == [f"q{i}#0" for i in range(4)]
        assert ranks[0]["po_loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference
        for r in pq.read_table(next((tmp_path / "one" / "ref_logps").glob("*.parquet"))).to_pylist():
            assert ref_two[r["id"]]["ref_chosen"] == pytest.approx(r["ref_chosen"], rel=1e-5)
            assert ref_two[r["id"]]["ref_long_w"] == pytest.approx(r["ref_long_w"], rel=1e-5)
