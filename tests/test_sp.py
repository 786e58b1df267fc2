"""Sequence parallelism (train.sp_size, DeepSpeed Ulysses/ALST) on CPU with gloo, on the tiny 2-layer model
(4 attention heads, 2 KV heads: sp 4 exercises ALST's KV-head replication).

The numerics: one launch per world size runs every case (algorithm x mode, shared prefix, ORPO's sequence NLL,
the DPO reference pass) on the same batch in float32 and reports per-example losses and rewards, the reference
log-probs and DeepSpeed's gradient norm; 2 and 4 ranks must equal 1 rank within 1e-5. Then the real `solopo train`
under SP: ZeRO-3 + SP, resume under SP, and the head-count error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (algo, mode, alpha, shared_prefix, orpo_nll): every loss and mode; solo with alpha=0 is the short-only baseline
CASES = [
    *[(a, m, None, False, "completion") for a in ("dpo", "simpo", "orpo") for m in ("solo", "long", "expand-long")],
    *[(a, "solo", 0.0, False, "completion") for a in ("dpo", "simpo", "orpo")],
    ("simpo", "short", None, False, "completion"),
    *[(a, "solo", None, True, "completion") for a in ("dpo", "simpo", "orpo")],
    ("orpo", "solo", None, False, "sequence"),
    ("orpo", "solo", None, True, "sequence"),
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, sp: int, model: Path, out: Path, zero: str = "zero2") -> dict:
    """`world` worker processes of this file (env rendezvous, gloo); rank 0's results."""
    port = _port()
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, __file__, str(model), str(out), str(sp), zero]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, tmp_path_factory):
    return launch(1, 1, tiny_model_dir, tmp_path_factory.mktemp("sp1") / "r.json")


def assert_same(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for case in set(want) - {"meta"}:
        for k, v in want[case].items():
            g = got[case][k]
            if isinstance(v, list):
                assert len(g) == len(v), (case, k)
                bad = [(a, b) for a, b in zip(g, v, strict=True) if abs(a - b) > tol * max(1.0, abs(b))]
                assert not bad, (case, k, bad)
            else:
                assert abs(g - v) <= tol * max(1.0, abs(v)), (case, k, g, v)


@pytest.mark.parametrize("world,sp", [(2, 2), (4, 4), (4, 2)], ids=["sp2", "sp4", "dp2xsp2"])
def test_sp_equals_one_rank_for_every_loss(tiny_model_dir, tmp_path, one_rank, world, sp):
    """Per-example losses, rewards (and the RA distance), DPO reference log-probs and the gradient norm under SP
    equal one rank's within 1e-5 for every case; dp2xsp2 also checks DP x SP (2 groups of 2, each half the batch)."""
    got = launch(world, sp, tiny_model_dir, tmp_path / "r.json")
    assert len(got) == len(CASES) + 2  # + the reference pass, meta
    # SP really ran: ALST's attention in place of sdpa, and each decoder call saw 1/sp of the longest row
    assert got["meta"]["sp"] == sp and "uattn_wrapper" in got["meta"]["sdpa"]
    assert "uattn" not in one_rank["meta"]["sdpa"]
    assert got["meta"]["max_tokens_per_call"] <= -(-one_rank["meta"]["max_tokens_per_call"] // sp)
    assert_same(got, one_rank)
    assert all(v["grad_norm"] > 0 for k, v in one_rank.items() if k != "reference")


def test_zero3_sp_equals_one_rank(tiny_model_dir, tmp_path, one_rank):
    """ZeRO-3 (parameters partitioned over both ranks) with sp 2: same values as one rank under ZeRO-2."""
    got = launch(2, 2, tiny_model_dir, tmp_path / "r.json", zero="zero3")
    assert got["meta"]["sp"] == 2 and "uattn_wrapper" in got["meta"]["sdpa"]
    assert_same(got, one_rank)


# --- the worker: python tests/test_sp.py MODEL OUT SP ZERO (one process per rank) ----------------------------------
def _worker(model: str, out_path: str, sp_size: int, zero: str) -> None:
    import pyarrow as pa
    import torch
    from test_train import export_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from solopo.training.config import TrainConfig
    from solopo.training.data import build_examples
    from solopo.training.logprobs import CompletionLogps, use_segment_attention
    from solopo.training.loop.backends import DeepSpeedBackend
    from solopo.training.loop.distributed import gather_rows, init_distributed
    from solopo.training.loop.reference import compute_ref_logps
    from solopo.training.loop.settings import build_ds_config, resolve_params
    from solopo.training.loop.step import _attach_ref, micro_batch_logps
    from solopo.training.losses import OBJECTIVES
    from solopo.training.seq_parallel import setup_sequence_parallel

    torch.manual_seed(0)
    rank, _, world = init_distributed(True)
    tok = AutoTokenizer.from_pretrained(model)
    rows = export_rows(4)
    for r in rows:  # pairs sampled on x_long too (mode=long)
        r.update(long_chosen_response=r["chosen_response"] + " Sure.", long_rejected_response="Paris, I think.")
    table = pa.Table.from_pylist(rows)
    cpu = torch.device("cpu")
    results: dict[str, dict] = {}
    base = TrainConfig(max_grad_norm=1e9, micro_batch_size=4, grad_accum=1, deepspeed=zero, sp_size=sp_size)

    def gathered(ids: list[str], vals: dict[str, list]) -> dict[str, list]:
        """Every DP group's examples, sorted by id (the ranks of one SP group hold identical values)."""
        cols = gather_rows({"id": ids, **vals}, world)
        order = sorted(range(len(cols["id"])), key=lambda i: cols["id"][i])
        return {k: [cols[k][i] for i in order] for k in vals}

    for shared in (False, True):  # one model per attention implementation: sdpa, then the shared-prefix segments
        import deepspeed

        if shared and sp_size > 1:  # ALST builds the SP groups once per process: release them for the second model
            from deepspeed.runtime.sequence_parallel import parallel_state_sp

            parallel_state_sp._release_sequence_parallel_groups()
        cfg = base.model_copy(update={"shared_prefix": shared})
        ds = build_ds_config(cfg, torch.float32, world)
        keep = HfDeepSpeedConfig(ds) if zero == "zero3" else None  # noqa: F841 (ZeRO-3 partitioned loading)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
        if shared:
            use_segment_attention(lm)
        sp = setup_sequence_parallel(lm, sp_size, rank, world, 3 if zero == "zero3" else 2)
        module = CompletionLogps(lm, chunk_size=8, sync_chunks=zero == "zero3" and world > 1, sp=sp)
        opt = torch.optim.AdamW(module.parameters(), lr=0.0)  # lr 0: every case starts from the same weights
        engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds, mpu=sp.mpu)
        backend = DeepSpeedBackend(engine, cfg)
        lengths: list[int] = []  # tokens per decoder call on this rank: the slice under SP
        lm.get_input_embeddings().register_forward_hook(lambda m, a, o, seen=lengths: seen.append(a[0].shape[1]))
        for algo, mode, alpha, shared_prefix, orpo_nll in CASES:
            if shared_prefix != shared:
                continue
            cfg = base.model_copy(update={"algo": algo, "mode": mode, "alpha": alpha, "orpo_nll": orpo_nll})
            params = resolve_params(cfg)
            with_long = mode == "solo" and params.alpha > 0
            examples, _ = build_examples(table, tok, mode, with_long, "x")
            mine = examples[sp.dp_rank :: sp.dp_size]  # this DP group's share of the batch
            batch, _ = micro_batch_logps(
                backend.forward, mine, tok.pad_token_id, with_long, orpo_nll == "sequence", cpu, shared
            )
            if algo == "dpo":  # a reference that differs from the policy, so that the loss is not log 2
                ref = {e.id: {"ref_chosen": -40.0 - i, "ref_rejected": -45.0 + i, "ref_long_w": -50.0 + i}
                       for i, e in enumerate(examples)}  # fmt: skip
                _attach_ref(batch, mine, ref, cfg.ra_ref, cpu)
            out = OBJECTIVES[algo](batch, params)
            backend.backward(out.loss.sum() / len(mine))
            backend.micro_done(boundary=True)
            keys = ("loss", "reward_chosen", "reward_rejected", "ra_distance")
            vals = {k: getattr(out, k).detach().tolist() for k in keys}
            vals["chosen_logp"] = batch.chosen.total.detach().tolist()
            if batch.nll_w is not None:
                vals["nll_w"] = batch.nll_w.total.detach().tolist()
            res = gathered([e.id for e in mine], vals)
            res["grad_norm"] = float(backend.grad_norm)
            results[f"{algo}-{mode}-alpha{alpha}-shared{int(shared)}-{orpo_nll}"] = res
        if not shared:  # the DPO reference pass (no grad), solo mode with the long reference
            examples, _ = build_examples(table, tok, "solo", True, "x")
            mine = examples[sp.dp_rank :: sp.dp_size]
            cols = compute_ref_logps(backend.forward, mine, tok.pad_token_id, 2, "ref", cpu, True)
            results["reference"] = gathered(cols.pop("id"), cols)
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            attn = ALL_ATTENTION_FUNCTIONS["sdpa"]
            results["meta"] = {"sp": sp.size, "max_tokens_per_call": max(lengths), "sdpa": attn.__qualname__}
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
