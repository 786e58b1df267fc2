"""`solopo plan` and the pre-launch check: the prediction against a measured CPU peak, the head-count rule for
sp_size, train.deepspeed=auto taking the plan's choice (recorded), and a refusal before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from solopo.pipeline.errors import SolopoError
from solopo.training import plan as P
from solopo.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory) -> Path:
    """A 2-layer model wide enough (hidden 256) that its step's memory stands out of RSS noise."""
    from solopo.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "wide", num_layers=2, hidden_size=256)


def _measure(model: Path, mode: str, long_len: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(REPO / "bench" / "plan" / "measure_cpu.py"), "--one", mode, str(long_len)]
    argv += ["--model", str(model), "--short", "512", "--completion", "64"]
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode,long_len", [("solo", 2048), ("long", 4096)])
def test_plan_matches_measured_peak_on_cpu(wide_model_dir, mode, long_len):
    """The plan (config.json only) against the peak of live tensors of one real train_step, measured from RSS in a
    fresh process: within 20% (bench/plan reports the embedded model's points; RSS adds a few MB of noise at this
    size)."""
    measured = _measure(wide_model_dir, mode, long_len)["measured_gb"]
    facts = P.load_model_facts(str(wide_model_dir))
    machine = P.Machine(gpus=1, gpu_mem_gb=24, device="cpu")
    shape = P.RunShape(mode=mode, algo="simpo", long_len=long_len, short_len=512, completion=64)
    tr = P.trace_step(facts, shape, machine.torch_dtype)
    predicted = P.estimate(facts, P.Combo(), machine, tr, two_forwards=mode == "solo").total / 2**30
    assert abs(predicted - measured) <= 0.20 * measured, (predicted, measured)


def test_trace_holds_no_quadratic_tensor(tiny_model_dir):
    """At 32K tokens one (s, s) bool mask would be 1 GiB; the traced step (as the code runs it: no mask, sdpa
    is_causal, chunked LM head) stays far below it."""
    facts = P.load_model_facts(str(tiny_model_dir))
    L = 32768
    tr = P.trace_step(facts, P.RunShape(mode="long", long_len=L, completion=64), torch.float32)
    assert tr.activations < L * L, tr


def qwen_like(heads: int = 28, kv: int = 4):
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        hidden_size=32 * heads // 4 * 4,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=1000,
    )
    return P.facts_from_config(cfg, f"qwen-like {heads}/{kv}")


def test_sp_head_count_rule(tmp_path):
    assert P.valid_sp_sizes(P.load_model_facts(str(big_config_dir(tmp_path))), 8) == [1, 2, 4, 8]  # 16 / 4 heads
    assert P.valid_sp_sizes(qwen_like(28, 4), 8) == [1, 2, 4]  # Qwen2.5-7B's heads: 7 and 28 do not divide 8
    assert P.valid_sp_sizes(qwen_like(32, 4), 8) == [1, 2, 4, 8]  # kv 4 < sp 8: DeepSpeed replicates KV heads
    assert P.valid_sp_sizes(qwen_like(28, 4), 6) == [1, 2]


def test_plan_refuses_sp_size_the_heads_do_not_allow():
    """The embedded SmolLM2 has 9 heads / 3 KV heads: sp 2 is refused (exit 2 through the CLI), naming the valid
    sizes, before any trace runs."""
    from solopo.pipeline.errors import ConfigError

    cfg = TrainConfig(sp_size=2)
    with pytest.raises(ConfigError, match=r"sp_size=2 does not fit.*9 attention heads, 3 KV heads.*1, 3, 9"):
        P.plan_for_config(cfg, None, 2048, P.Machine(gpus=2, gpu_mem_gb=80))


def big_config_dir(tmp_path: Path) -> Path:
    """A checkpoint dir with a config.json only (the plan needs no weights): 0.6B parameters in 8 layers."""
    from transformers import LlamaConfig

    d = tmp_path / "cfg-only"
    LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ).save_pretrained(d)
    return d


def test_cli_plan_json_and_emit(tmp_path, tiny_model_dir, keep_logging):
    from typer.testing import CliRunner

    from solopo.cli import app

    model = str(tiny_model_dir)
    args = ["plan", "--model", model, "--target-len", "4k", "--gpus", "2", "--gpu-mem", "80", "--json"]
    res = CliRunner().invoke(app, [*args, "--completion", "64", "--emit", str(tmp_path / "launch")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert out["valid_sp"] == [1, 2] and out["choice"]["fits"] and out["choice"]["combo"]["label"] == "plain sp1"
    labels = [e["combo"]["label"] for e in out["estimates"]]
    assert labels[:3] == ["plain sp1", "ZeRO-2 sp1", "ZeRO-3 sp1"] and "ZeRO-3+off-all sp1 lora" in labels
    for e in out["estimates"]:  # every row is split into its parts, which add up to the total at the peak
        parts = e["weights"] + e["gradients"] + e["optimizer"] + e["activations"] + e["logits"]
        assert parts == pytest.approx(e["total"], rel=1e-6) and e["max_len"] >= 4096
    z3 = next(e for e in out["estimates"] if e["combo"]["label"] == "ZeRO-3 sp1")
    plain, n = out["estimates"][0], out["params"]
    # hand-worked: plain torch AdamW keeps exp_avg + exp_avg_sq in bf16 (4 bytes/param); ZeRO-3 keeps fp32
    # master + Adam state (12 bytes/param) sharded over the 2 ranks
    assert plain["optimizer"] == pytest.approx(4 * n / 2**30) and z3["optimizer"] == pytest.approx(6 * n / 2**30)
    launch = tmp_path / "launch"
    cmd = (launch / "train_command.sh").read_text()
    assert f"--model {model}" in cmd and "train.num_processes=2" in cmd and "train.deepspeed=none" in cmd
    assert "slots=2" in (launch / "hostfile").read_text()


def test_auto_takes_the_plans_choice_and_records_it(tmp_path, monkeypatch):
    """On a GPU, train.deepspeed=auto becomes the fastest setting that fits: with a budget between plain torch's
    peak and ZeRO-2's on 8 GPUs, ZeRO-2; the note and the stats say so (they go to the train manifest)."""
    model = big_config_dir(tmp_path)
    facts = P.load_model_facts(str(model))
    rows = [{"target_len": 2048, "short_tokens": 500, "long_tokens": 2000, "chosen_tokens": 100, "rejected_tokens": 80}]
    table = pa.Table.from_pylist(rows)
    monkeypatch.setattr(P.torch.cuda, "is_available", lambda: True)
    shape = P.RunShape(mode="solo", long_len=2016, short_len=516, completion=116)
    two = [P.Combo("none"), P.Combo("zero2")]
    probe = P.make_plan(facts, shape, P.Machine(gpus=8, gpu_mem_gb=1000), only=two, search=False)
    total = {e.combo.label: e.total for e in probe.estimates}
    assert total["ZeRO-2 sp1"] < total["plain sp1"]
    mem = (total["ZeRO-2 sp1"] + total["plain sp1"]) / 2 / (1 - P.DEFAULT_MARGIN)
    notes, stats = [], {}
    cfg = TrainConfig(deepspeed="auto", gpu_mem_gb=mem)
    out = P.prelaunch_check(cfg, str(model), table, 8, notes.append, stats.__setitem__)
    assert out.deepspeed == "zero2"
    assert any(n.startswith("train.deepspeed=auto -> zero2 (memory plan:") for n in notes), notes
    assert stats["plan_setting"] == "ZeRO-2 sp1" and stats["plan_peak_gb"] <= mem


def test_train_refuses_before_loading_the_model(tmp_path, tiny_model_dir, keep_logging, monkeypatch):
    """`solopo train` with a configuration the plan says cannot fit stops with exit 2 and the table, before the
    training loop (and its model load) starts; train.skip_plan=true launches anyway."""
    import test_train
    from typer.testing import CliRunner

    from solopo.cli import app
    from solopo.training.loop import trainer

    original = test_train.export_rows

    def rows() -> list[dict]:
        return [dict(r, chosen_tokens=20, rejected_tokens=20) for r in original()]

    monkeypatch.setattr(test_train, "export_rows", rows)
    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={tiny_model_dir}"]
    test_train.write_export_chain(run_dir, common)
    loaded = []

    def no_train(*a, **k):
        loaded.append(1)
        raise SolopoError("the training loop started")

    monkeypatch.setattr(trainer, "train", no_train)
    sets = [x for c in common for x in ("--set", c)]
    res = CliRunner().invoke(app, ["train", *sets, "--set", "train.gpu_mem_gb=0.01"])
    assert res.exit_code == 2, res.output
    assert "does not fit 0.01 GiB per GPU" in res.output and "plain sp1" in res.output and "skip_plan" in res.output
    assert not loaded
    res = CliRunner().invoke(app, ["train", *sets, "--set", "train.gpu_mem_gb=0.01", "--set", "train.skip_plan=true"])
    assert loaded and "the training loop started" in res.output


def test_cpu_without_gpu_memory_skips_with_a_note(tiny_model_dir):
    notes = []
    cfg = TrainConfig()
    assert P.prelaunch_check(cfg, str(tiny_model_dir), None, 1, notes.append, lambda *a: None) is cfg
    assert notes == ["memory plan not checked: no GPU, and train.gpu_mem_gb is not set"]


def test_hub_id_without_cache_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SolopoError, match="not in the local Hugging Face cache"):
        P.load_model_facts("no-such-org/no-such-model-xyz")


def _sp_probe(model: Path, zero: str, sps: list[int], gpus: int = 8) -> dict[int, float]:
    """Per-rank totals (GiB) of `zero` at each sp for the rows of test_sp_auto_*: what prelaunch_check computes."""
    facts = P.load_model_facts(str(model))
    shape = P.RunShape(mode="solo", long_len=16016, short_len=1016, completion=116)
    probe = P.make_plan(facts, shape, P.Machine(gpus=gpus, gpu_mem_gb=1000), only=[P.Combo(zero, sp=s) for s in sps],
                        search=False)  # fmt: skip
    return {e.combo.sp: e.total for e in probe.estimates}


SP_ROWS = [
    {"target_len": 16384, "short_tokens": 1000, "long_tokens": 16000, "chosen_tokens": 100, "rejected_tokens": 80}
]


def test_sp_auto_takes_the_smallest_sp_that_fits_and_records_it(tmp_path, monkeypatch):
    """train.sp_size=auto on 8 GPUs (16 heads / 4 KV heads: sp 1, 2, 4, 8): with a budget between sp 1's peak and
    sp 2's, sp 2 (the smallest that fits: fewer all-to-alls, more data parallelism); with room for sp 1, sp 1; with
    room for none, exit 2 listing every sp. The note and the stats (the train manifest) say what was chosen."""
    model = big_config_dir(tmp_path)
    monkeypatch.setattr(P.torch.cuda, "is_available", lambda: True)
    total = _sp_probe(model, "zero3", [1, 2, 4, 8])
    assert total[8] < total[4] < total[2] < total[1], total  # activations split over the sp ranks
    table = pa.Table.from_pylist(SP_ROWS)

    def check(mem_gib: float) -> tuple[TrainConfig, list[str], dict]:
        notes, stats = [], {}
        cfg = TrainConfig(deepspeed="zero3", sp_size="auto", gpu_mem_gb=mem_gib / (1 - P.DEFAULT_MARGIN))
        return P.prelaunch_check(cfg, str(model), table, 8, notes.append, stats.__setitem__), notes, stats

    out, notes, stats = check((total[1] + total[2]) / 2)
    assert out.sp_size == 2 and out.deepspeed == "zero3"
    assert any(n.startswith("train.sp_size=auto -> 2 (memory plan:") and "of 1, 2, 4, 8 on 8 rank(s)" in n
               for n in notes), notes  # fmt: skip
    assert stats["sp_size"] == 2 and stats["plan_setting"] == "ZeRO-3 sp2"
    assert check(total[1] * 1.01)[0].sp_size == 1
    with pytest.raises(P.PlanError) as e:
        check(total[8] * 0.9)
    assert all(f"ZeRO-3 sp{s}" in str(e.value) for s in (1, 2, 4, 8)), str(e.value)


def test_sp_auto_with_deepspeed_auto_prefers_the_smaller_sp_over_the_faster_zero(tmp_path, monkeypatch):
    """Both auto on a GPU: candidates run sp first, then the ZeRO speed order; sp > 1 never plain torch."""
    model = big_config_dir(tmp_path)
    monkeypatch.setattr(P.torch.cuda, "is_available", lambda: True)
    z2, z3 = _sp_probe(model, "zero2", [1, 2]), _sp_probe(model, "zero3", [1, 2])
    plain = _sp_probe(model, "none", [1])[1]
    assert z3[1] < z2[1] < plain and z3[2] < z3[1] and z2[2] < z3[1] * 1.01  # sp 2 under ZeRO-2 would fit too
    notes, stats = [], {}
    cfg = TrainConfig(sp_size="auto", gpu_mem_gb=z3[1] * 1.01 / (1 - P.DEFAULT_MARGIN))
    out = P.prelaunch_check(cfg, str(model), pa.Table.from_pylist(SP_ROWS), 8, notes.append, stats.__setitem__)
    assert (out.sp_size, out.deepspeed) == (1, "zero3"), notes  # sp 1 fits under ZeRO-3: no sp 2 with ZeRO-2


def test_sp_auto_without_a_memory_figure_is_one_with_a_note(tiny_model_dir):
    notes, stats = [], {}
    out = P.prelaunch_check(TrainConfig(sp_size="auto"), str(tiny_model_dir), None, 2, notes.append,
                            stats.__setitem__)  # fmt: skip
    assert out.sp_size == 1 and stats == {"sp_size": 1}
    assert notes == [
        "memory plan not checked: no GPU, and train.gpu_mem_gb is not set",
        "train.sp_size=auto -> 1 (no memory plan to choose by; set train.gpu_mem_gb, or a number)",
    ]
    out = P.prelaunch_check(TrainConfig(sp_size="auto", attn="eager", gpu_mem_gb=1000), str(tiny_model_dir), None, 2,
                            notes.append, stats.__setitem__)  # fmt: skip
    assert out.sp_size == 1  # no token counts in the data: no plan either


def test_hostfile_world_counts_slots_and_names_a_bad_line(tmp_path):
    from solopo.pipeline.errors import ConfigError
    from solopo.training.launch import hostfile_world

    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nnode1 slots=8\n\nnode2 slots=8  # second\n")
    assert hostfile_world(str(hf)) == 16
    hf.write_text("node1 slots=8\nnode2\n")
    with pytest.raises(ConfigError, match=r"hostfile:2: expected `hostname slots=N`.*'node2'"):
        hostfile_world(str(hf))


def test_lora_adapter_bytes_follow_the_dtype_the_code_keeps(tmp_path):
    """training.peft.wrap keeps LoRA adapters in the base dtype under ZeRO-3 (bf16 on a GPU) and in fp32 elsewhere
    (PEFT's autocast_adapter_dtype): the reduce bucket of adapter gradients is 2 bytes a value under ZeRO-3 and 4
    under ZeRO-2 (hand-worked: fp32 gradient partition 4 T / n plus two buckets of min(bucket, T) values)."""
    facts = P.load_model_facts(str(big_config_dir(tmp_path)))
    machine = P.Machine(gpus=8, gpu_mem_gb=80, device="cuda", dtype="bf16")
    tr = P.trace_step(facts, P.RunShape(mode="long", long_len=1024, completion=64), torch.bfloat16)
    T = facts.lora_params(16)
    for zero, nbytes in (("zero3", 2), ("zero2", 4)):
        parts = P.estimate(facts, P.Combo(zero, peft="lora"), machine, tr, lora_r=16)
        bucket = min(P._ds_numbers(zero)["reduce_bucket"], T)
        assert parts.step_grads == pytest.approx(4 * T / 8 + 2 * bucket * nbytes), zero


def test_emit_writes_the_chosen_sp_into_the_deepspeed_config(tmp_path):
    """A choice with sp 2 on 8 GPUs (train.sp_size=auto in the config): ds_config.json carries
    sequence_parallel_size 2 and a train batch over 4 data-parallel groups; the command sets train.sp_size=2."""
    model = big_config_dir(tmp_path)
    facts = P.load_model_facts(str(model))
    shape = P.RunShape(mode="solo", long_len=4096, short_len=1024, completion=128)
    plan = P.make_plan(facts, shape, P.Machine(gpus=8, gpu_mem_gb=80), only=[P.Combo("zero3", sp=2)], search=False)
    cfg = TrainConfig(sp_size="auto", micro_batch_size=1, grad_accum=4)
    P.emit(plan, tmp_path / "launch", str(model), cfg)
    ds = json.loads((tmp_path / "launch" / "ds_config.json").read_text())
    assert ds["sequence_parallel_size"] == 2 and ds["train_batch_size"] == 1 * 4 * (8 // 2)
    assert "--set train.sp_size=2" in (tmp_path / "launch" / "train_command.sh").read_text()
