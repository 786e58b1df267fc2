"""Sequence parallelism (train.sp_size): per-rank peak memory and step time at several SP sizes, one fixed long
length, through the real step (`train_step` -> CompletionLogps under DeepSpeed ALST, ZeRO-2), on CPU with gloo.

    python3 bench/train/sp.py [--shape embedded] [--sps 1,3] [--long 4k] [--short 512] [--completion 64]
        [--steps 2] [--tag cpu-embedded]

Each SP size is one launch of `sp` ranks (dp 1: every rank holds the same example and decodes 1/sp of each row).
Per rank and step, in solo mode (SoLo-RA on): the pair forward (x_short + y_w, x_short + y_l: 2 rows) and the long
forward (x_long + y_w: 1 row) both run through the SP group (each rank decodes 1/sp of every row). Measured per
rank: the step time of a pair-only step (alpha=0: no long forward) and of the full solo step, so the long
forward's share is their difference; and the peak RSS over the measured steps above the RSS before them
(VmHWM reset through /proc/self/clear_refs after a warm-up step that allocates AdamW's state): the activation
memory of the step, which should fall about as 1/sp. The load average is recorded beside every timing.

CPU only here (no GPU was lent to this task): step times on a 2-core machine shared with other jobs are noisy and
N ranks share the same 2 cores (a step cannot get faster with sp here); the memory column is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.append(p)


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _length(s: str) -> int:
    return int(float(s[:-1]) * 1024) if s.lower().endswith("k") else int(s)


# --- one rank ---------------------------------------------------------------------------------------------
def rank_main(a) -> None:
    import torch
    from shapes import build

    from solopo.training.config import TrainConfig
    from solopo.training.data import Example, Seq
    from solopo.training.logprobs import CompletionLogps
    from solopo.training.loop.backends import DeepSpeedBackend, make_scheduler
    from solopo.training.loop.distributed import init_distributed
    from solopo.training.loop.settings import build_ds_config
    from solopo.training.loop.step import train_step
    from solopo.training.losses import OBJECTIVES, LossParams
    from solopo.training.seq_parallel import setup_sequence_parallel

    torch.set_num_threads(1)
    rank, _, world = init_distributed(True)
    dev = torch.device("cpu")
    cfg = TrainConfig(
        algo="simpo", mode="solo", micro_batch_size=1, grad_accum=1, lr=1e-7, deepspeed="zero2", dtype="fp32",
        gradient_checkpointing=True, max_grad_norm=1.0, warmup_ratio=0.0, sp_size=world,
    )  # fmt: skip
    lm = build(a.shape, dev, torch.float32)
    lm.config.use_cache = False
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sp = setup_sequence_parallel(lm, world, rank, world)
    module = CompletionLogps(lm, chunk_size=1024, sp=sp).train()
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr)
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=module, optimizer=opt, lr_scheduler=make_scheduler(opt, cfg, 100),
        config=build_ds_config(cfg, torch.float32, world), mpu=sp.mpu,
    )  # fmt: skip
    backend = DeepSpeedBackend(engine, cfg)
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size

    def ids(n: int) -> list[int]:
        return torch.randint(100, min(40000, vocab), (n,), generator=g).tolist()

    def example(long: int) -> Example:
        w, lo, x = ids(a.completion), ids(a.completion - a.completion // 4), ids(a.short)
        return Example("e", Seq(x, w), Seq(x, lo), Seq(ids(long), w))

    objective = OBJECTIVES["simpo"]
    ex = [example(a.long)]
    solo, pair_only = LossParams(alpha=1.0, beta=2.0), LossParams(alpha=0.0, beta=2.0)
    train_step(backend, objective, solo, [example(max(a.short, 256))], cfg, 2, True, dev)  # warm-up: AdamW state
    import torch.distributed as dist

    out = {}
    for name, params, with_long in (("pair_only", pair_only, False), ("solo", solo, True)):
        dist.barrier()
        base = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        times = []
        for _ in range(a.steps):
            dist.barrier()
            t0 = time.perf_counter()
            train_step(backend, objective, params, ex, cfg, 2, with_long, dev)
            times.append(time.perf_counter() - t0)
        out[name] = {
            "step_s": sorted(times)[len(times) // 2],
            "peak_rss_gib": _kib("VmHWM") / 2**20,
            "step_peak_above_base_gib": (_kib("VmHWM") - base) / 2**20,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }
    parts: list = [None] * world
    dist.all_gather_object(parts, {"rank": rank, **out})
    if rank == 0:
        Path(a.out).write_text(json.dumps(parts))


# --- the launcher -----------------------------------------------------------------------------------------------
def launch(sp: int, a, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(sp):
        env = {
            **os.environ, "PYTHONPATH": f"{REPO}:{HERE}", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(sp), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }  # fmt: skip
        cmd = [sys.executable, __file__, "--rank", "--out", str(out), "--shape", a.shape, "--long", str(a.long),
               "--short", str(a.short), "--completion", str(a.completion), "--steps", str(a.steps)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"sp={sp} failed:\n" + "\n".join(x[-3000:] for x in logs))
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", action="store_true", help="internal: run one rank")
    ap.add_argument("--out", default="")
    ap.add_argument("--shape", default="embedded")
    ap.add_argument("--sps", default="1,3", help="SP sizes (each must divide the model's attention heads)")
    ap.add_argument("--long", default="4k")
    ap.add_argument("--short", default="512")
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tag", default="cpu-embedded")
    a = ap.parse_args()
    a.long, a.short = _length(str(a.long)), _length(str(a.short))
    if a.rank:
        rank_main(a)
        return
    rows = []
    for sp in map(int, a.sps.split(",")):
        t0 = time.time()
        parts = launch(sp, a, HERE / f".sp{sp}.json")
        (HERE / f".sp{sp}.json").unlink()
        for p in parts:
            rows.append({"sp": sp, **p})
        print(f"sp={sp}: {time.time() - t0:.0f}s", flush=True)
    base = {k: max(r[k]["step_peak_above_base_gib"] for r in rows if r["sp"] == rows[0]["sp"]) for k in ("solo",)}
    base_t = max(r["solo"]["step_s"] for r in rows if r["sp"] == rows[0]["sp"])
    lines = [
        f"# Sequence parallelism on {a.shape}: long {a.long} + short {a.short} tokens, completion {a.completion} "
        f"(CPU, gloo, ZeRO-2, float32, gradient checkpointing; `python3 bench/train/sp.py --shape {a.shape} --sps "
        f"{a.sps} --long {a.long} --short {a.short} --steps {a.steps}`)",
        "",
        "No GPU was lent to this task: CPU rows only. All ranks share the machine's 2 cores, so step times do not",
        "fall with sp here; the per-rank memory of the step does. Ratios are against the first SP size of this run.",
        "",
        "| sp | rank | pair-only step s | solo step s | long fwd+bwd share | step peak above base GiB (solo) "
        "| ratio vs first | peak RSS GiB | load avg (1/5/15 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s, p = r["solo"], r["pair_only"]
        lines.append(
            f"| {r['sp']} | {r['rank']} | {p['step_s']:.2f} | {s['step_s']:.2f} | "
            f"{max(0.0, s['step_s'] - p['step_s']) / s['step_s']:.0%} | {s['step_peak_above_base_gib']:.3f} | "
            f"{s['step_peak_above_base_gib'] / base['solo']:.2f} | {s['peak_rss_gib']:.2f} | {' '.join(s['loadavg'])} |"
        )
    worst = {
        sp: max(r["solo"]["step_peak_above_base_gib"] for r in rows if r["sp"] == sp) for sp in {r["sp"] for r in rows}
    }
    slow = {sp: max(r["solo"]["step_s"] for r in rows if r["sp"] == sp) for sp in worst}
    lines += ["", "Per SP size (worst rank): step memory ratio and solo step-time ratio vs the first SP size:"]
    lines += [
        f"- sp {sp}: memory x{worst[sp] / base['solo']:.2f}, step time x{slow[sp] / base_t:.2f}" for sp in sorted(worst)
    ]
    stem = HERE / f"sp_{a.tag}"
    Path(f"{stem}.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
