"""Sequence parallelism (train.sp_size, DeepSpeed Ulysses/ALST) on CPU with gloo, on the tiny 2-layer model
(width 128: 4 attention heads, 2 KV heads; sp 4 exercises ALST's KV-head replication).

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
import torch

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


def launch(world: int, sps: str, model: Path, out: Path, zero: str = "zero2") -> dict:
    """`world` worker processes of this file (env rendezvous, gloo) running the cases at SP size `sps`; rank 0's
    results by SP size."""
    return launch_args(world, [str(model), str(out), sps, zero], out)


def launch_args(world: int, args: list[str], out: Path, env_extra: dict | None = None, ok: bool = True) -> dict:
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
            **(env_extra or {}),
        }
        cmd = [sys.executable, __file__, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    if not ok:
        assert all(p.returncode != 0 for p in procs), "\n".join(x[-3000:] for x in logs)
        return {"logs": logs}
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """The tiny Llama at width 128: 4 attention heads, 2 KV heads (valid sp sizes 1, 2, 4; sp 4 replicates KV)."""
    from solopo.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-4h", num_layers=2, hidden_size=128)


@pytest.fixture(scope="module")
def one_rank(sp_model, tmp_path_factory):
    return launch(1, "1", sp_model, tmp_path_factory.mktemp("sp1") / "r.json")


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


# one launch per topology: a second ALST setup in a process that already ran one under another SP size desyncs gloo
@pytest.mark.slow  # ranks launched as processes (a minute or more on 2 cores)
@pytest.mark.parametrize("world,sps", [(2, "2"), (4, "4"), (4, "2")], ids=["sp2", "sp4", "dp2xsp2"])
def test_sp_equals_one_rank_for_every_loss(sp_model, tmp_path, one_rank, world, sps):
    """Per-example losses, rewards (and the RA distance), DPO reference log-probs and the gradient norm under SP
    equal one rank's within 1e-5 for every case: sp 2, sp 4 (KV heads replicated), and 4 ranks as 2 DP groups of
    sp 2 (each group half the batch)."""
    got_all = launch(world, sps, sp_model, tmp_path / "r.json")
    one = one_rank["1"]
    assert all(v["grad_norm"] > 0 for k, v in one.items() if k not in ("reference", "meta"))
    assert "uattn" not in one["meta"]["sdpa"]
    got, sp = got_all[sps], int(sps)
    assert len(got) == len(CASES) + 2  # + the reference pass, meta
    # SP really ran: ALST's attention in place of sdpa, and each decoder call saw 1/sp of the longest row
    assert got["meta"]["sp"] == sp and "uattn_wrapper" in got["meta"]["sdpa"]
    assert got["meta"]["max_tokens_per_call"] <= -(-one["meta"]["max_tokens_per_call"] // sp)
    assert_same(got, one)


@pytest.mark.slow  # ranks launched as processes (a minute or more on 2 cores)
def test_train_zero3_sp_resumes_and_equals_one_rank(sp_model, tmp_path):
    """The real train() on 2 ranks, ZeRO-3 (parameters partitioned over both), sp 2: killed after its step-2
    checkpoint, relaunched, it resumes there; its per-step losses, rewards and gradient norms and its final weights
    equal one plain process's (step 1 within 1e-5; later steps within 1e-4: Adam's m/sqrt(v) magnifies the last
    float32 bits of tiny gradients after the first update, as in tests/test_train_multirank.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import run, weights

    kw = dict(algo="dpo", max_steps=3, save_steps=2, micro_batch_size=1, grad_accum=1, lr=1e-3, max_grad_norm=1e9)
    out, res = tmp_path / "sp", tmp_path / "result.json"
    spec = json.dumps({**kw, "deepspeed": "zero3", "sp_size": 2})
    args = ["train", str(sp_model), str(out), spec, str(res)]
    crashed = launch_args(2, args, res, env_extra={"SOLOPO_TEST_KILL_AT_STEP": "3"}, ok=False)
    assert any("simulated kill at step 3" in x for x in crashed["logs"])
    ckpt = out / "models" / "dpo-solo.checkpoints"
    assert (ckpt / "step-2").exists() and not (out / "models" / "dpo-solo" / "_SUCCESS").exists()
    got = launch_args(2, args, res)
    assert any("resumed from checkpoint" in n and "step-2" in n for n in got["notes"]), got["notes"]
    assert got["sp_size"] == 2 and got["world_size"] == 2 and got["deepspeed"] == "zero3" and got["steps"] == 3

    one = run(tmp_path / "one", sp_model, **{**kw, "deepspeed": "none"})  # the same batches (dp 1)
    rows = [json.loads(x) for x in (Path(got["model_path"]) / "logs.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (Path(one["model_path"]) / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for k in ("loss", "rewards/chosen", "rewards/rejected", "ra_distance", "grad_norm", "num_tokens"):
        assert rows[0][k] == pytest.approx(ref[0][k], rel=1e-5, abs=1e-6), k
        assert [r[k] for r in rows] == pytest.approx([r[k] for r in ref], rel=1e-4, abs=1e-5), k
    w_sp, w_one = weights(got["model_path"]), weights(one["model_path"])
    for k in w_one:
        # lr 1e-3: Adam moves an element by up to ~lr a step, and a near-zero fp32 gradient whose sign differs
        # between the two runs moves it by a fraction of that (seen: 10 of 6.3M elements, up to 3.9e-5)
        torch.testing.assert_close(w_sp[k], w_one[k], rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ranks launched as processes (a minute or more on 2 cores)
def test_lora_under_zero3_sp_equals_one_rank(sp_model, tmp_path):
    """LoRA (adapter-off reference) with ZeRO-3 and sp 2 on 2 ranks: the real train()'s per-step losses, rewards and
    gradient norms equal one plain process's on the same batches (float32)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import run

    kw = dict(algo="dpo", max_steps=2, save_steps=0, micro_batch_size=1, grad_accum=1, lr=1e-3, max_grad_norm=1e9,
              peft="lora")  # fmt: skip
    res = tmp_path / "result.json"
    spec = json.dumps({**kw, "deepspeed": "zero3", "sp_size": 2})
    got = launch_args(2, ["train", str(sp_model), str(tmp_path / "sp"), spec, str(res)], res)
    assert got["peft"]["method"] == "lora" and got["sp_size"] == 2 and got["deepspeed"] == "zero3"
    one = run(tmp_path / "one", sp_model, **{**kw, "deepspeed": "none"})
    rows = [json.loads(x) for x in (Path(got["model_path"]) / "logs.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (Path(one["model_path"]) / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
        assert [r[k] for r in rows] == pytest.approx([r[k] for r in ref], rel=1e-4, abs=1e-5), k


@pytest.mark.slow  # ranks launched as processes (a minute or more on 2 cores)
def test_head_count_error_names_valid_sizes(tmp_path, sp_model):
    """sp_size=3 with 4 attention heads: the CLI stops before launching (exit 2) and names the valid sizes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import write_export_chain

    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={sp_model}", "run.seed=0"]
    write_export_chain(run_dir, common)
    sets = [*common, "train.num_processes=3", "train.sp_size=3", "train.deepspeed=zero2", "train.max_steps=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "solopo.cli", "train"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log[-3000:]
    assert (
        "train.sp_size=3" in log
        and "4 attention heads, 2 KV heads" in log
        and "Valid sp sizes for this model: 1, 2, 4" in log
    )
    assert "launching" not in log and "Traceback" not in log


def test_sp_config_checks(sp_model):
    from pydantic import ValidationError

    from solopo.pipeline.errors import ConfigError
    from solopo.training.config import TrainConfig
    from solopo.training.seq_parallel import check_sp, valid_sp_sizes

    for bad, msg in ((0, "greater than or equal to 1"), ("two", "valid integer"), (2.5, "valid integer")):
        with pytest.raises(ValidationError, match=msg):
            TrainConfig(sp_size=bad)
    assert TrainConfig(sp_size="auto").sp_size == "auto"  # resolved by the memory plan (tests/test_plan.py)
    TrainConfig(sp_size="auto", deepspeed="none")  # fine: auto then keeps to 1
    with pytest.raises(ValidationError, match="sp_size > 1 runs through DeepSpeed"):
        TrainConfig(sp_size=2, deepspeed="none")
    with pytest.raises(ValidationError, match="eager"):
        TrainConfig(sp_size=2, attn="eager")
    # Qwen2.5-7B (28 heads, 4 KV heads): 8 does not divide 28; 7 and 14 neither divide 4 KV heads nor are multiples
    assert valid_sp_sizes(28, 4) == [1, 2, 4, 28]
    assert valid_sp_sizes(32, 8) == [1, 2, 4, 8, 16, 32]  # Llama-3-8B: 16 and 32 replicate the 8 KV heads
    assert valid_sp_sizes(4, 2) == [1, 2, 4]
    check_sp(TrainConfig(sp_size=4), str(sp_model), 8)  # fine: 4 heads, 2 KV heads replicated
    with pytest.raises(ConfigError, match="divisible by it \\(now 6\\)"):
        check_sp(TrainConfig(sp_size=4), str(sp_model), 6)


@pytest.mark.slow  # ranks launched as processes (a minute or more on 2 cores)
def test_sp_auto_through_the_cli_trains_with_the_plans_choice(tmp_path, sp_model, monkeypatch):
    """`solopo train --set train.sp_size=auto` on 2 CPU ranks (ZeRO-2) with train.gpu_mem_gb between the plan's
    peaks for sp 1 and sp 2: the plan picks sp 2 before launching, the ranks train with it (DeepSpeed's launcher,
    ALST), and the train manifest records the choice and why. (test_plan.py checks the choice at scale; here the
    point is that the choice reaches the ranks.)"""
    import pyarrow as pa

    sys.path.insert(0, str(Path(__file__).parent))
    import test_train
    from test_train import write_export_chain

    from solopo.training import plan as P
    from solopo.training.config import TrainConfig

    rows = [dict(r, chosen_tokens=20, rejected_tokens=20) for r in test_train.export_rows()]
    monkeypatch.setattr(test_train, "export_rows", lambda: rows)  # token counts: what the plan reads
    settings = {"num_processes": 2, "deepspeed": "zero2", "max_steps": 1, "micro_batch_size": 1, "grad_accum": 1}
    short, long_len, comp = P._lengths_from_data(pa.Table.from_pylist(rows), None)
    shape = P.RunShape.from_train_config(TrainConfig(**settings), long_len, short, comp)
    probe = P.make_plan(P.load_model_facts(str(sp_model)), shape, P.Machine(gpus=2, gpu_mem_gb=1000, device="cpu"),
                        only=[P.Combo("zero2", sp=1), P.Combo("zero2", sp=2)], search=False)  # fmt: skip
    sp1, sp2 = (e.total for e in probe.estimates)
    assert sp2 < sp1, (sp1, sp2)
    mem = (sp1 + sp2) / 2 / (1 - P.DEFAULT_MARGIN)

    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={sp_model}", "run.seed=0"]
    write_export_chain(run_dir, common)
    sets = [*common, *(f"train.{k}={v}" for k, v in settings.items()), "train.sp_size=auto", f"train.gpu_mem_gb={mem}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "solopo.cli", "train", "--algo", "dpo"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "train.sp_size=auto -> 2 (memory plan:" in log and "launching 2 process(es): deepspeed" in log
    m = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert m["stats"]["sp_size"] == 2 and m["stats"]["plan_setting"] == "ZeRO-2 sp2" and m["stats"]["world_size"] == 2
    assert any(n.startswith("train.sp_size=auto -> 2") for n in m["notes"]), m["notes"]
    assert any("sequence parallel 2" in n or "train.sp_size=2:" in n for n in m["notes"]), m["notes"]


# --- the worker: python tests/test_sp.py MODEL OUT SP ZERO (one process per rank) ----------------------------------
def _worker(model: str, out_path: str, sp_sizes: str, zero: str) -> None:
    """Every case at one SP size (`sp_sizes`: one number), rank 0 writes {sp: {case: values}}."""
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
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def gathered(ids: list[str], vals: dict[str, list]) -> dict[str, list]:
        """Every DP group's examples, sorted by id (the ranks of one SP group hold identical values)."""
        cols = gather_rows({"id": ids, **vals}, world)
        order = sorted(range(len(cols["id"])), key=lambda i: cols["id"][i])
        return {k: [cols[k][i] for i in order] for k in vals}

    sp_size, results = int(sp_sizes), {}
    for shared in (False, True):  # one model per attention implementation: sdpa, then the shared-prefix segments
        import deepspeed
        from deepspeed.runtime.sequence_parallel import parallel_state_sp

        # ALST builds the SP groups once per process and wraps the registered attention: undo both for the second model
        parallel_state_sp._release_sequence_parallel_groups()
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        base = TrainConfig(max_grad_norm=1e9, micro_batch_size=4, grad_accum=1, deepspeed=zero, sp_size=sp_size)
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
            attn = ALL_ATTENTION_FUNCTIONS["sdpa"]
            results["meta"] = {"sp": sp.size, "max_tokens_per_call": max(lengths), "sdpa": attn.__qualname__}
    if rank == 0:
        Path(out_path).write_text(json.dumps({str(sp_size): results}))


def _train_worker(model: str, out_dir: str, spec: str, result_path: str) -> None:
    """One rank of the real train(); SOLOPO_TEST_KILL_AT_STEP=N dies in step N (after the step-2 checkpoint)."""
    import pyarrow as pa
    from test_train import export_rows

    import solopo.training.loop.step as step
    from solopo.training.config import TrainConfig
    from solopo.training.loop.trainer import train

    kill = int(os.environ.get("SOLOPO_TEST_KILL_AT_STEP", 0))
    real, calls = step._Agg.finish, []

    def finish(self, *a, **k):
        calls.append(1)
        if len(calls) == kill:
            raise SystemExit(f"simulated kill at step {kill}")
        return real(self, *a, **k)

    step._Agg.finish = finish
    cfg = TrainConfig(**{"gradient_checkpointing": False, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                         **json.loads(spec)})  # fmt: skip
    result = train(cfg, model, table=pa.Table.from_pylist(export_rows()), out_dir=out_dir, seed=0)
    if int(os.environ["RANK"]) == 0:
        Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1] == "train":
        _train_worker(*sys.argv[2:])
    else:
        _worker(*sys.argv[1:5])
