"""Measured peak memory of one real training step on the CPU, for bench_plan.py to set beside the plan's prediction.

    python3 bench/plan/measure_cpu.py --one solo 4096 [--short 1024 --completion 64 --algo simpo]
    python3 bench/plan/measure_cpu.py --points solo:2k,solo:4k,long:2k [...]    # one fresh child per point

Each point runs in a fresh child with MALLOC_MMAP_THRESHOLD_=1 MiB (large tensors come from mmap and go back on
free, so RSS follows live tensors instead of glibc's heap; see bench/train/results.md). The child builds what
`solopo train` builds on a CPU (the embedded model in fp32, sdpa, gradient checkpointing, CompletionLogps with
train.logps_chunk, torch AdamW, PlainBackend) and runs `solopo.training.loop.step.train_step` - the loop's own step
(forward, backward, clip, AdamW) - once on a short warm-up example (thread pools, optimizer state), then resets the
peak mark (/proc/self/clear_refs = 5) and runs one step at full size. Reported: VmHWM of that step minus the
process's non-tensor memory (RSS before the step minus the bytes of weights and AdamW state, counted exactly),
i.e. the peak of live tensors as the plan models it, and the raw RSS figures beside it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GIB = 2**30


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def one(
    mode: str, long_len: int, short: int, comp: int, algo: str, chunk: int, threads: int, model: str | None = None
) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from solopo.models import resolve_model
    from solopo.training.config import TrainConfig
    from solopo.training.data import Example, Seq
    from solopo.training.logprobs import CompletionLogps
    from solopo.training.loop.backends import PlainBackend, make_scheduler
    from solopo.training.loop.settings import resolve_params
    from solopo.training.loop.step import train_step
    from solopo.training.losses import OBJECTIVES

    cfg = TrainConfig(algo=algo, mode=mode, micro_batch_size=1, grad_accum=1, logps_chunk=chunk, lr=1e-7)
    lm = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32, attn_implementation="sdpa")
    lm.config.use_cache = False
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CompletionLogps(lm, chunk_size=chunk).train()
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr)
    backend = PlainBackend(module, opt, make_scheduler(opt, cfg, 10), cfg)
    params = resolve_params(cfg)
    g = torch.Generator().manual_seed(long_len)

    def ids(n: int) -> list[int]:
        return torch.randint(100, 40000, (n,), generator=g).tolist()

    def example(s: int, lo: int) -> Example:
        w, r = ids(comp), ids(comp - comp // 4)  # the rejected answer a quarter shorter: the pair is padded
        if mode == "solo":
            x = ids(s)
            return Example("x", Seq(x, w), Seq(x, r), Seq(ids(lo), w))
        if mode == "short":
            x = ids(s)
            return Example("x", Seq(x, w), Seq(x, r), None)
        x = ids(lo)
        return Example("x", Seq(x, w), Seq(x, r), None)

    with_long = mode == "solo" and params.alpha > 0
    dev = torch.device("cpu")
    train_step(backend, OBJECTIVES[algo], params, [example(256, 256)], cfg, 2, with_long, dev)  # warm-up
    static = sum(p.numel() * p.element_size() for p in module.parameters())
    static += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    rss0 = _kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    ex = example(short, long_len)
    train_step(backend, OBJECTIVES[algo], params, [ex], cfg, 2, with_long, dev)
    hwm = _kib("VmHWM") * 1024
    overhead = rss0 - static  # interpreter, libraries, thread stacks: memory the plan does not model
    return {
        "mode": mode,
        "long_len": long_len,
        "short_len": short,
        "completion": comp,
        "algo": algo,
        "logps_chunk": chunk,
        "tokens": ex.tokens,
        "threads": threads,
        "rss_before_gb": rss0 / GIB,
        "vmhwm_gb": hwm / GIB,
        "weights_optimizer_gb": static / GIB,
        "overhead_gb": overhead / GIB,
        "measured_gb": (hwm - overhead) / GIB,
    }


def parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("MODE", "LEN"))
    ap.add_argument("--points", default="solo:2k,solo:4k,solo:8k,long:2k,long:4k")
    ap.add_argument("--short", default="1k")
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--algo", default="simpo")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "measured_cpu.json"))
    ap.add_argument("--model", default=None, help="a checkpoint dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--merge", action="store_true", help="keep --out's rows of other points (and their commands)")
    a = ap.parse_args()
    if a.one:
        r = one(a.one[0], parse_len(a.one[1]), parse_len(a.short), a.completion, a.algo, a.chunk, a.threads, a.model)
        print(json.dumps(r))
        return
    out = Path(a.out)
    kept, commands = [], [" ".join(sys.argv)]
    if a.merge and out.exists():
        old = json.loads(out.read_text())
        new_points = {(m, parse_len(x)) for m, x in (p.split(":") for p in a.points.split(","))}
        kept = [r for r in old["rows"] if (r["mode"], r["long_len"]) not in new_points]
        commands = old.get("commands", [old.get("command")]) + commands
    rows: list[dict] = []
    for p in a.points.split(","):
        mode, length = p.split(":")
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "MALLOC_MMAP_THRESHOLD_": str(2**20),
            "OMP_NUM_THREADS": str(a.threads),
        }
        argv = [sys.executable, __file__, "--one", mode, length, "--short", a.short, "--completion", str(a.completion)]
        argv += ["--algo", a.algo, "--chunk", str(a.chunk), "--threads", str(a.threads)]
        p_ = subprocess.run(argv, env=env, capture_output=True, text=True)
        if p_.returncode != 0:
            raise SystemExit(f"child {mode} {length} failed:\n{p_.stderr[-3000:]}")
        r = json.loads(p_.stdout.strip().splitlines()[-1])
        r["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
        rows.append(r)
        print(json.dumps(r), flush=True)
        tmp = out.with_suffix(".tmp")
        every = sorted(kept + rows, key=lambda r: (r["long_len"], r["mode"] != "solo"))
        tmp.write_text(json.dumps({"commands": commands, "rows": every}, indent=2) + "\n")
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
