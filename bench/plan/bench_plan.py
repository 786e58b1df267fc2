"""`solopo plan`'s predictions beside measured peaks, with the error on every point.

    python3 bench/plan/bench_plan.py                  # predict for the points in measured_cpu.json + the GPU points
    python3 bench/plan/bench_plan.py --measure        # first measure the CPU points (measure_cpu.py, minutes each)

CPU points: measure_cpu.py runs `solopo.training.loop.step.train_step` on the embedded SmolLM2-135M (fp32, sdpa,
gradient checkpointing, plain torch, AdamW) in a fresh child per point and reports the peak of live tensors from
RSS; the plan predicts the same step from the model's config.json alone (nothing fitted on these points).

GPU points: the only GPU figures this project has are issue 13's, measured once on one H200 before this bench
existed (the numbers are in the issue text; no results file of that run was committed): a random-weight
Qwen2.5-7B shape, bf16, sdpa, gradient checkpointing, fused AdamW, ORPO, short prompt 1024, completion 128, one
example per step, the CUDA allocator capped at 80 GiB: the longest long prompt that trained was 61,440 tokens in
solo mode and 28,672 in long mode. At that time the long mode's padded pair still built a dense (2, 1, s, s) bool
padding mask (issue 13, item 4; removed since), so the long point's prediction adds its bytes. The plan's CUDA
allocator factor (Machine.alloc_factor) was fitted to these two points, so their errors are in-sample; the CPU
errors are not.

Writes results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench" / "train"))  # shapes.py: the Qwen2.5 shapes of bench/train

GPU_POINTS = [  # issue 13: one H200, 80 GiB cap
    {"mode": "solo", "measured_max_len": 61440, "dense_pair_mask": False},
    {"mode": "long", "measured_max_len": 28672, "dense_pair_mask": True},
]


def cpu_rows(measured: list[dict]) -> list[dict]:
    from solopo.training.plan import Combo, Machine, RunShape, estimate, load_model_facts, trace_step

    facts = load_model_facts(None)
    machine = Machine(gpus=1, gpu_mem_gb=24, device="cpu")
    rows = []
    for m in measured:
        shape = RunShape(
            mode=m["mode"],
            algo=m["algo"],
            long_len=m["long_len"],
            short_len=m["short_len"],
            completion=m["completion"],
            logps_chunk=m["logps_chunk"],
        )
        t0 = time.time()
        tr = trace_step(facts, shape, machine.torch_dtype)
        parts = estimate(facts, Combo(), machine, tr, two_forwards=shape.mode == "solo")
        pred = parts.total / 2**30
        rows.append(
            {
                **{k: m[k] for k in ("mode", "long_len", "short_len", "completion", "algo", "tokens", "loadavg")},
                "measured_gb": round(m["measured_gb"], 3),
                "predicted_gb": round(pred, 3),
                "error_pct": round(100 * (pred - m["measured_gb"]) / m["measured_gb"], 1),
                "predicted_split_gb": {
                    "weights": round(parts.weights / 2**30, 3),
                    "optimizer": round(parts.optimizer / 2**30, 3),
                    "gradients": round(max(parts.fb_grads, parts.step_grads) / 2**30, 3),
                    "activations": round(parts.activations / 2**30, 3),
                    "logits": round(parts.logits / 2**30, 3),
                },
                "trace_s": round(time.time() - t0, 1),
            }
        )
    return rows


def gpu_rows() -> list[dict]:
    from shapes import SHAPES
    from transformers import Qwen2Config

    from solopo.training.plan import (
        Combo,
        Machine,
        RunShape,
        _max_len,
        estimate,
        facts_from_config,
        trace_step,
    )

    cfg = Qwen2Config(**SHAPES["qwen2.5-7b"], max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6)
    facts = facts_from_config(cfg, "Qwen2.5-7B shape")
    machine = Machine(gpus=1, gpu_mem_gb=80, device="cuda", fused_adam=True)
    budget = 80 * 2**30
    comp = 128
    rows = []
    for p in GPU_POINTS:
        shape = RunShape(mode=p["mode"], algo="orpo", long_len=p["measured_max_len"], short_len=1024, completion=comp)

        def fb_of(L: int, shape: RunShape = shape, mask: bool = p["dense_pair_mask"]) -> float:
            from dataclasses import replace

            tr = trace_step(facts, replace(shape, long_len=L), machine.torch_dtype)
            extra = 2 * (L + comp) ** 2 if mask else 0  # the old dense (2, 1, s, s) bool padding mask
            return estimate(facts, Combo(), machine, tr, two_forwards=shape.mode == "solo").fb + extra

        tr = trace_step(facts, shape, machine.torch_dtype)
        parts = estimate(facts, Combo(), machine, tr, two_forwards=shape.mode == "solo")
        peak_at = max(fb_of(p["measured_max_len"]), parts.step) / 2**30
        pred_len = _max_len(fb_of, parts.step, budget, p["measured_max_len"], limit=2**20)
        rows.append(
            {
                "mode": p["mode"],
                "dense_pair_mask": p["dense_pair_mask"],
                "measured_max_len": p["measured_max_len"],
                "predicted_max_len": pred_len,
                "len_error_pct": round(100 * (pred_len - p["measured_max_len"]) / p["measured_max_len"], 1),
                "predicted_peak_at_measured_gb": round(peak_at, 2),
                "cap_gb": 80,
                "peak_error_pct_vs_cap": round(100 * (peak_at - 80) / 80, 1),
            }
        )
    return rows


def write(cpu: list[dict], gpu: list[dict], meta: dict) -> None:
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "cpu": cpu, "gpu": gpu}, indent=2) + "\n")
    lines = [
        "# bench/plan: `solopo plan`'s predicted peak memory vs measured",
        "",
        f"`{meta['command']}` (git {meta['git']}); load average {' '.join(meta['loadavg'])} at the end; "
        f"{meta['seconds']:.0f} s to predict every point (trace time is load-dependent, memory is not).",
        "",
        "## CPU: one real `train_step` on the embedded SmolLM2-135M (fp32, plain torch, AdamW)",
        "",
        "Measured = the step's VmHWM minus the process's non-tensor memory (RSS before the step minus weights and "
        "AdamW state, counted exactly), in a fresh child per point with MALLOC_MMAP_THRESHOLD_=1 MiB "
        "(`measure_cpu.py`). Predicted = the plan from config.json only; nothing is fitted to these points.",
        "Measured by: " + "; ".join(f"`{c}`" for c in meta.get("measured_by", [])),
        "",
        "| mode | long | short | completion | algo | measured GiB | predicted GiB | error | load (1/5/15 min) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in cpu:
        lines.append(
            f"| {r['mode']} | {r['long_len']} | {r['short_len']} | {r['completion']} | {r['algo']} | "
            f"{r['measured_gb']:.3f} | {r['predicted_gb']:.3f} | {r['error_pct']:+.1f}% | {' '.join(r['loadavg'])} |"
        )
    if cpu:
        worst = max(abs(r["error_pct"]) for r in cpu)
        lines += ["", f"Largest CPU error: {worst:.1f}% (goal: within 15%)."]
    lines += [
        "",
        "## GPU: issue 13's H200 runs (Qwen2.5-7B shape, bf16, fused AdamW, ORPO, short 1024, completion 128, 80 GiB cap)",
        "",
        "The CUDA allocator factor (1.19 on the step's changing part) was fitted to these two points: in-sample.",
        "",
        "| mode | dense pair mask (old code) | measured max long | predicted max long | error | predicted peak at "
        "the measured length | vs the 80 GiB cap |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in gpu:
        lines.append(
            f"| {r['mode']} | {'yes' if r['dense_pair_mask'] else 'no'} | {r['measured_max_len']:,} | "
            f"{r['predicted_max_len']:,} | {r['len_error_pct']:+.1f}% | {r['predicted_peak_at_measured_gb']} GiB | "
            f"{r['peak_error_pct_vs_cap']:+.1f}% |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", action="store_true", help="run measure_cpu.py first (default points)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU points (each traces a 7B shape)")
    a = ap.parse_args()
    if a.measure:
        subprocess.run([sys.executable, str(HERE / "measure_cpu.py")], check=True)
    t0 = time.time()
    measured_file = json.loads((HERE / "measured_cpu.json").read_text())
    measured = measured_file["rows"]
    cpu = cpu_rows(measured)
    gpu = [] if a.no_gpu else gpu_rows()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    meta = {
        "command": "python3 bench/plan/bench_plan.py " + " ".join(sys.argv[1:]),
        "git": git.stdout.strip(),
        "loadavg": os.getloadavg() and Path("/proc/loadavg").read_text().split()[:3],
        "seconds": time.time() - t0,
        "measured_by": measured_file.get("commands", [measured_file.get("command")]),
    }
    write(cpu, gpu, meta)


if __name__ == "__main__":
    main()
