"""Why the transformers sampler collapsed on a busy CPU: OpenMP spin-waiting, measured.

    PYTHONPATH=. python3 bench/sample/bench_omp_wait.py [--repeats 3]

One decode step of the embedded SmolLM2-135M (16 rows, 300-token KV cache, dtype bf16 where the CPU has bf16
units, else fp32), median of 10, in fresh processes (OpenMP reads its wait policy at load): torch threads =
physical cores with OpenMP's default wait policy (threads spin at barriers; STEP imports torch
before solopo, so solopo's PASSIVE default does not apply) vs OMP_WAIT_POLICY=PASSIVE (what
solopo sets before torch loads), and 1 thread. Configurations alternate so machine load hits all of them; the
1-minute load average is recorded per row. Writes omp_wait.json and omp_wait.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

STEP = r"""
import json, os, sys, time, torch
from transformers import AutoModelForCausalLM, DynamicCache
from solopo.hardware import cpu_has_native_bf16
from solopo.models import resolve_model
torch.set_num_threads(int(sys.argv[1]))
dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
m = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=dtype).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, 1000, (16, 300), generator=g)
times = []
with torch.inference_mode():
    cache = DynamicCache(config=m.config)
    m(input_ids=ids, past_key_values=cache, use_cache=True)
    tok = torch.randint(100, 1000, (16, 1), generator=g)
    for _ in range(12):
        t = time.perf_counter()
        m(input_ids=tok, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
times = sorted(times[2:])
print(json.dumps({"median_step_ms": round(times[len(times) // 2] * 1000, 1), "dtype": str(dtype)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from solopo.hardware import physical_cores

    cores = physical_cores()
    configs = [(cores, None), (cores, "PASSIVE"), (1, None)]
    rows = []
    for rep in range(args.repeats):
        for threads, policy in configs:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
            env.pop("OMP_WAIT_POLICY", None)  # unset = OpenMP's default (spin, then sleep)
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            load = os.getloadavg()[0]
            out = subprocess.run(
                [sys.executable, "-c", STEP, str(threads)], env=env, capture_output=True, text=True, timeout=600
            )
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(repeat=rep + 1, threads=threads, omp_wait_policy=policy or "unset (spin)")
            r["load_average_1m"] = {"before": round(load, 2), "after": round(os.getloadavg()[0], 2)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    res = {
        "what": "median decode-step time, SmolLM2-135M, 16 rows, by torch threads and OpenMP wait policy",
        "cpu_count": os.cpu_count(),
        "physical_cores": cores,
        "rows": rows,
    }
    (HERE / "omp_wait.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Decode step on a shared CPU: OpenMP wait policy",
        "",
        f"SmolLM2-135M, 16 rows, 300-token cache, {cores} physical cores ({os.cpu_count()} CPUs). Each row is a "
        "fresh process; rows alternate so machine load hits every configuration.",
        "",
        "| repeat | threads | OMP_WAIT_POLICY | median step ms | load avg before/after |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        la = r["load_average_1m"]
        lines.append(
            f"| {r['repeat']} | {r['threads']} | {r['omp_wait_policy']} | {r['median_step_ms']} | "
            f"{la['before']}/{la['after']} |"
        )
    (HERE / "omp_wait.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
