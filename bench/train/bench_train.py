"""Step time and peak memory of SoLoPO (`solo`: short+chosen, short+rejected, long+chosen) against Long-PO
(`long`: long+chosen, long+rejected) at long lengths 1K-8K with the short prompt fixed near 1K, on the embedded
SmolLM2-135M, one run on one machine. Each (mode, length) runs in its own process so the peak RSS is its own.

    python3 bench/train/bench_train.py [--lengths 1k,2k,4k,8k] [--short 1k] [--completion 128] [--steps 1]

Writes bench/train/results.json and results.md, and prints measured ratios next to the predicted compute ratio
(2 rho^2 + 1) / 2 with rho = |x_short| / |x_long| (the paper's model counts attention-quadratic cost; at these
lengths on a 135M model the linear MLP/projection cost dominates, so the measured ratio sits between that and
the token ratio (2 rho + 1) / 2, which is also printed)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def one(mode: str, long_len: int, short_len: int, comp: int, steps: int, algo: str) -> dict:
    """Runs in a child process: time `steps` optimizer steps of one example through the training code path."""
    import torch
    from transformers import AutoModelForCausalLM

    from solopo.models import resolve_model
    from solopo.training.data import Example, Seq
    from solopo.training.logprobs import CompletionLogps
    from solopo.training.loop.trainer import micro_batch_logps, peak_memory_gb
    from solopo.training.losses import OBJECTIVES, LossParams

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32, attn_implementation="sdpa")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CompletionLogps(lm, chunk_size=1024).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-7)
    g = torch.Generator().manual_seed(long_len)
    ids = lambda n: torch.randint(100, 40000, (n,), generator=g).tolist()  # noqa: E731  synthetic, exact lengths
    w, lo = ids(comp), ids(comp)
    if mode == "solo":
        short = ids(short_len - 0)
        ex = Example("x", Seq(short, w), Seq(short, lo), Seq(ids(long_len), w))
    else:
        long = ids(long_len)
        ex = Example("x", Seq(long, w), Seq(long, lo), None)
    params = LossParams(alpha=1.0 if mode == "solo" else 0.0, beta=2.0)
    dev = torch.device("cpu")

    def step():
        batch, tokens = micro_batch_logps(module, [ex], 2, mode == "solo", False, dev)
        OBJECTIVES[algo](batch, params).loss.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tokens = step()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "long_len": long_len, "short_len": short_len, "completion": comp, "tokens": tokens,
            "step_s": min(times), "peak_rss_gb": peak_memory_gb(dev)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1k,2k,4k,8k")
    ap.add_argument("--short", default="1k")
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--algo", default="simpo")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(**json.loads(a.child))))
        return
    from solopo.pipeline.config import parse_length, parse_lengths

    short = parse_length(a.short)
    rows = []
    for L in parse_lengths(a.lengths):
        for mode in ("solo", "long"):
            spec = {"mode": mode, "long_len": L, "short_len": short, "comp": a.completion, "steps": a.steps,
                    "algo": a.algo}
            t0 = time.time()
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{mode:5s} long={L:6d}: {r['step_s']:.2f} s/step, peak RSS {r['peak_rss_gb']:.2f} GB "
                  f"({time.time() - t0:.0f}s wall)", flush=True)
    table = []
    for L in parse_lengths(a.lengths):
        s = next(r for r in rows if r["mode"] == "solo" and r["long_len"] == L)
        g = next(r for r in rows if r["mode"] == "long" and r["long_len"] == L)
        rho = (short + a.completion) / (L + a.completion)
        table.append({"long_len": L, "rho": round(rho, 3), "solo_step_s": round(s["step_s"], 3),
                      "long_step_s": round(g["step_s"], 3), "time_ratio": round(s["step_s"] / g["step_s"], 3),
                      "predicted_ratio": round((2 * rho**2 + 1) / 2, 3), "token_ratio": round((2 * rho + 1) / 2, 3),
                      "solo_peak_gb": round(s["peak_rss_gb"], 3), "long_peak_gb": round(g["peak_rss_gb"], 3),
                      "mem_ratio": round(s["peak_rss_gb"] / g["peak_rss_gb"], 3)})
    import torch

    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "model": "SmolLM2-135M-Instruct (embedded, fp32, sdpa, gradient checkpointing)", "algo": a.algo,
            "short_len": short, "completion": a.completion, "steps_timed": a.steps,
            "memory": "peak RSS of the process (CPU); includes the model, AdamW state and the runtime",
            "note": "one example per step; synthetic token ids of exact lengths; lower time/memory ratio = solo wins"}
    (HERE / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": table}, indent=2) + "\n")
    lines = ["# bench/train: SoLoPO (solo) vs Long-PO (long), one machine, one run", "",
             f"{meta['model']}; {meta['machine']}, {meta['cpus']} CPUs; short {short} tokens, completion "
             f"{a.completion}; algo {a.algo}; {meta['memory']}.", "",
             "| long len | rho | solo s/step | long s/step | solo/long time | predicted (2rho^2+1)/2 | token ratio "
             "(2rho+1)/2 | solo peak GB | long peak GB | solo/long memory |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        lines.append(f"| {t['long_len']} | {t['rho']} | {t['solo_step_s']} | {t['long_step_s']} | {t['time_ratio']} | "
                     f"{t['predicted_ratio']} | {t['token_ratio']} | {t['solo_peak_gb']} | {t['long_peak_gb']} | "
                     f"{t['mem_ratio']} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
