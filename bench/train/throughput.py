"""Training throughput: tokens/s and MFU of the real optimizer step (`train_step`, the loop `solopo train` runs)
for plain torch, DeepSpeed ZeRO-2 and ZeRO-3 at one rank, against the bare forward + backward + AdamW of the
same tokens, with a torch.profiler breakdown of one step (forward, collation, backward, optimizer, host syncs).

    python3 bench/train/bench_train.py --throughput [--shapes embedded,qwen2-tiny] [--backends plain,zero2,zero3]
        [--short 256] [--long 1k] [--completion 64] [--micro 2] [--accum 2] [--steps 3] [--tag cpu]

Each (shape, backend) runs in a fresh child process. MFU = model FLOPs per step (shapes.train_flops: 6 N per
token for the body, 6 N_head per target token, causal attention; recompute not counted) / step time / peak.
The peak: CUDA, the device's dense bf16 peak from its datasheet (table below; else a measured bf16 GEMM);
CPU, a measured fp32 GEMM at the same thread count (stated in the results: a CPU has no datasheet number here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.append(p)

# dense bf16 tensor-core peaks (FLOP/s) from the vendor datasheets (SXM parts)
DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
LABELS = (
    "solopo.forward",
    "solopo.collate",
    "solopo.backward",
    "solopo.micro_done",
    "solopo.optimizer",
    "solopo.host_sync",
)


def measure_peak(device, dtype, threads: int) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(0)
        for k, v in DATASHEET_PEAK.items():
            if k in name:
                return v, f"{name}: datasheet dense bf16 {v / 1e12:.0f} TFLOP/s"
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t0))
    return (
        best,
        f"measured {str(dtype).removeprefix('torch.')} GEMM {n}^3, best of 5, {threads} thread(s): "
        f"{best / 1e9:.1f} GFLOP/s",
    )


def child(shape: str, backend_name: str, a) -> dict:
    import torch
    from shapes import attended_pairs, build, counts, train_flops

    from solopo.training.config import TrainConfig
    from solopo.training.data import Example, Seq, collate
    from solopo.training.logprobs import CompletionLogps, targets_from_masks
    from solopo.training.loop.backends import DeepSpeedBackend, PlainBackend, make_scheduler
    from solopo.training.loop.distributed import init_distributed
    from solopo.training.loop.settings import build_ds_config
    from solopo.training.loop.step import train_step
    from solopo.training.losses import OBJECTIVES, LossParams

    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    use_ds = backend_name != "plain"
    init_distributed(use_ds)
    lm = build(shape, dev, dtype)
    c = counts(lm)  # before ZeRO-3 partitions the parameters (numel 0 after)
    if a.checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CompletionLogps(lm, chunk_size=1024).to(dev).train()
    cfg = TrainConfig(
        algo="simpo",
        mode="solo",
        micro_batch_size=a.micro,
        grad_accum=a.accum,
        lr=1e-7,
        deepspeed=backend_name if use_ds else "none",
        dtype="bf16" if cuda else "fp32",
        gradient_checkpointing=a.checkpointing,
        max_grad_norm=1.0,
        warmup_ratio=0.0,
    )
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, **({"fused": True} if cuda and not use_ds else {}))
    sched = make_scheduler(opt, cfg, 1000)
    if use_ds:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=build_ds_config(cfg, dtype, 1)
        )
        backend = DeepSpeedBackend(engine, cfg)
    else:
        backend = PlainBackend(module, opt, sched, cfg)
    params = LossParams(alpha=1.0, beta=2.0)
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    n = a.micro * a.accum

    def ids(k: int) -> list[int]:
        return torch.randint(100, min(40000, vocab), (k,), generator=g).tolist()

    def examples(scale: float) -> list[Example]:
        """Solo examples whose lengths vary by +-10% (padding inside a micro-batch, as in real data)."""
        out = []
        for i in range(n):
            f = scale * (0.9 + 0.2 * i / max(1, n - 1))
            s, lg, c = int(a.short * f), int(a.long * f), max(4, int(a.completion * f))
            w, lo = ids(c), ids(c - c // 4)
            x = ids(s)
            out.append(Example(f"e{i}", Seq(x, w), Seq(x, lo), Seq(ids(lg), w)))
        return out

    def sync():
        if cuda:
            torch.cuda.synchronize()

    ex = examples(1.0)
    objective = OBJECTIVES["simpo"]
    train_step(backend, objective, params, examples(0.25), cfg, 2, True, dev)  # warm-up (allocations, AdamW state)
    sync()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        agg = train_step(backend, objective, params, ex, cfg, 2, True, dev)
        row = agg.finish(0.0, dev, 1)  # the per-step read the loop does for its logs
        sync()
        times.append(time.perf_counter() - t0)
    tokens = row["tokens"]

    # bare: the same tokens, collated beforehand, forward + backward + AdamW, no metrics, no syncs, no clipping
    bare_s = None
    if not use_ds:
        pre = []
        for m in range(a.accum):
            chunk = ex[m * a.micro : (m + 1) * a.micro]
            for seqs in ([e.chosen for e in chunk] + [e.rejected for e in chunk], [e.long_w for e in chunk]):
                x, _, masks = collate(seqs, 2)
                pre.append((m, x.to(dev), [t.to(dev) for t in targets_from_masks(masks)]))
        from solopo.training.logprobs import Targets

        def bare_step():
            for m in range(a.accum):
                loss = 0
                for mm, x, tg in pre:
                    if mm == m:
                        loss = loss + module(x, None, Targets(*tg))[0].total.sum()
                (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        bare_step()
        sync()
        bt = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            bare_step()
            sync()
            bt.append(time.perf_counter() - t0)
        bare_s = statistics.median(bt)

    # one profiled step
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        train_step(backend, objective, params, ex, cfg, 2, True, dev).finish(0.0, dev, 1)
        sync()
        prof_wall = time.perf_counter() - t0
    ka = {e.key: e for e in prof.key_averages()}

    def ms(key: str, field: str = "cpu_time_total") -> float:
        e = ka.get(key)
        return round(getattr(e, field, 0.0) / 1e3, 2) if e is not None else 0.0

    breakdown = {k.removeprefix("solopo."): ms(k) for k in LABELS}
    breakdown["forward_excl_collate"] = round(breakdown["forward"] - breakdown["collate"], 2)
    syncs = {
        k: {"count": ka[k].count if k in ka else 0, "ms": ms(k)}
        for k in ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")
    }
    device_ms = {k.removeprefix("solopo."): ms(k, "device_time_total") for k in LABELS} if cuda else None

    seq_lens = [len(s) for e in ex for s in (e.chosen, e.rejected, e.long_w)]
    targets = sum(len(s.completion) for e in ex for s in (e.chosen, e.rejected, e.long_w))
    flops = train_flops(lm.config, c["body"], c["head"], sum(seq_lens), targets, attended_pairs(seq_lens))
    peak, peak_note = measure_peak(dev, dtype, a.threads)
    step_s = statistics.median(times)
    return {
        "shape": shape,
        "backend": backend_name,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu"),
        "dtype": str(dtype).removeprefix("torch."),
        "params": c["total"],
        "tokens_per_step": tokens,
        "step_s": step_s,
        "step_times": [round(t, 3) for t in times],
        "tokens_per_s": tokens / step_s,
        "bare_step_s": bare_s,
        "step_over_bare": round(step_s / bare_s, 3) if bare_s else None,
        "flops_per_step": flops,
        "peak_flops": peak,
        "peak_note": peak_note,
        "mfu": flops / step_s / peak,
        "profile_ms": breakdown,
        "profile_wall_ms": round(prof_wall * 1e3, 1),
        "host_syncs": syncs,
        "profile_device_ms": device_ms,
        "threads": a.threads,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench_train.py --throughput")
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "BACKEND"))
    ap.add_argument("--shapes", default="embedded,qwen2-tiny")
    ap.add_argument("--backends", default="plain,zero2,zero3")
    ap.add_argument("--short", type=int, default=256)
    ap.add_argument("--long", type=int, default=1024)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 on a shared CPU (OpenMP threads spin and stall when cores are oversubscribed)",
    )
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(HERE))
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.child:
        print(json.dumps(child(*a.child, a)))
        return
    rows = []
    t_run = time.time()
    passthrough = [
        f"--{k}={getattr(a, k)}" for k in ("short", "long", "completion", "micro", "accum", "steps", "threads")
    ] + ([] if a.checkpointing else ["--no-checkpointing"])
    for shape in a.shapes.split(","):
        for be in a.backends.split(","):
            t0 = time.time()
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(a.threads),
                "TOKENIZERS_PARALLELISM": "false",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(29500 + len(rows)),
            }
            p = subprocess.run(
                [sys.executable, str(HERE / "bench_train.py"), "--throughput", "--child", shape, be, *passthrough],
                capture_output=True,
                text=True,
                env=env,
            )
            if p.returncode != 0:
                print(f"{shape} {be}: FAILED\n{p.stderr[-2000:]}", flush=True)
                rows.append({"shape": shape, "backend": be, "error": p.stderr[-1500:]})
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(
                f"{shape:12s} {be:6s}: {r['step_s']:.2f} s/step, {r['tokens_per_s']:.0f} tok/s, MFU "
                f"{100 * r['mfu']:.1f}%, step/bare {r['step_over_bare']} [{time.time() - t0:.0f}s]",
                flush=True,
            )
    import torch

    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {
        "command": "python3 bench/train/bench_train.py --throughput " + " ".join(argv),
        "git": git.stdout.strip(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_at_end": load,
        "torch": torch.__version__,
        "wall_minutes": round((time.time() - t_run) / 60, 1),
        "knobs": vars(a),
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"throughput{'_' + a.tag if a.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    ok = [r for r in rows if "error" not in r]
    lines = [
        f"# bench/train --throughput, one run on {ok[0]['device_name'] if ok else '?'}",
        "",
        f"`{meta['command']}` (git {meta['git']}), {meta['wall_minutes']} min wall; {meta['machine']}, "
        f"{meta['cpus']} CPUs, load average {' '.join(load)} at the end; torch {meta['torch']}.",
        "",
        f"One optimizer step = `train_step` (the loop `solopo train` runs): mode solo (short+chosen and "
        f"short+rejected in one padded forward, long+chosen in a second), {a.micro} examples per micro-batch x "
        f"{a.accum} micro-batches, short prompt ~{a.short}, long prompt ~{a.long}, completion ~{a.completion} "
        f"(lengths vary +-10%, rejected a quarter shorter), gradient checkpointing "
        f"{'on' if a.checkpointing else 'off'}, SimPO, {a.threads} torch thread(s). bare = forward + backward + "
        f"AdamW of the same pre-collated tokens, nothing else. Peak: {ok[0]['peak_note'] if ok else '?'}.",
        "",
        "| shape | backend | params | tokens/step | s/step (median) | tokens/s | MFU | step / bare |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['backend']} | failed: {r['error'].strip().splitlines()[-1][:120]} |||||")
            continue
        lines.append(
            f"| {r['shape']} | {r['backend']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.2f}% | {r['step_over_bare'] or '-'} |"
        )
    lines += [
        "",
        "Profile of one step (torch.profiler, inclusive CPU ms of the labelled ranges in `train_step`; "
        "collate is inside forward; host syncs = aten::_local_scalar_dense calls (.item(), bool(), float() of a "
        "tensor) and aten::nonzero):",
        "",
        "| shape | backend | step wall ms | forward (excl. collate) | collate | backward | optimizer | "
        "micro_done | host_sync | _local_scalar_dense n / ms | nonzero n |",
        "|---|---|" + "---:|" * 9,
    ]
    for r in ok:
        b, sy = r["profile_ms"], r["host_syncs"]
        lines.append(
            f"| {r['shape']} | {r['backend']} | {r['profile_wall_ms']} | {b['forward_excl_collate']} | "
            f"{b['collate']} | {b['backward']} | {b['optimizer']} | {b['micro_done']} | {b['host_sync']} | "
            f"{sy['aten::_local_scalar_dense']['count']} / {sy['aten::_local_scalar_dense']['ms']} | "
            f"{sy['aten::nonzero']['count']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
