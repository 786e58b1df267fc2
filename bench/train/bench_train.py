"""Step time and peak memory of SoLoPO (`solo`: short+chosen, short+rejected, long+chosen) against Long-PO
(`long`: long+chosen, long+rejected) at long lengths 1K-8K with the short prompt fixed near 1K, on the embedded
SmolLM2-135M through the training code path (CompletionLogps + micro_batch_logps + the loss + AdamW), in one run.

    python3 bench/train/bench_train.py [--lengths 1k,2k,4k,8k] [--short 1k] [--completion 64] [--steps 2]
    python3 bench/train/bench_train.py --one solo 4096 [...]      # one measurement (what the parent runs)
    python3 bench/train/bench_train.py --modes solo,solo-shared --lengths 1k,4k --tag shared_prefix
                                   # train.shared_prefix: the pair's prompt computed once (results_shared_prefix.*)

Every (mode, length) runs in its own fresh child process, so no measurement inherits another's heap (glibc keeps
freed memory, which made a long-lived process report less for 8K than for 4K). In the child: model + optimizer,
one warm-up step on a small example of the same mode (thread pools, kernel selection, AdamW state allocation),
then the peak-RSS mark is reset (/proc/self/clear_refs = 5) and >= `--steps` full-size steps are timed (more, up
to `--max-steps`, while the timed total is under `--min-seconds`). Reported per child: median step time, the peak
RSS of the timed steps (VmHWM) and its rise over the RSS before them (activations and temporaries), and the whole
child's ru_maxrss as seen by the parent (os.wait4). On CUDA the peak is torch.cuda.max_memory_allocated.

The parent copies the `solopo` package and this script to a temp dir first, so every child runs the same code even if the tree is
edited during the run. Writes results.json, results.md and results.png next to this file, and prints the measured
solo/long ratios beside the predicted compute ratio (2 rho^2 + 1) / 2, rho = |x_short| / |x_long| (the paper's
attention-quadratic model), and the token ratio (2 rho' + 1) / 2 over whole sequences (the linear-cost bound).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: a child's PYTHONPATH (the snapshot) comes first


# --- child: one (mode, length) measurement ----------------------------------------------------------------
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS
        return True
    except OSError:
        return False


def one(mode: str, long_len: int, short_len: int, comp: int, steps: int, max_steps: int, min_seconds: float,
        warmup_len: int, algo: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from solopo.models import resolve_model
    from solopo.training.data import Example, Seq
    from solopo.training.logprobs import CompletionLogps
    from solopo.training.loop.trainer import micro_batch_logps
    from solopo.training.losses import OBJECTIVES, LossParams

    cuda = torch.cuda.is_available()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32, attn_implementation="sdpa")
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = CompletionLogps(lm, chunk_size=1024).to(dev).train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-7)
    shared = mode == "solo-shared"  # train.shared_prefix=true: [prompt, chosen, rejected] in one packed row
    mode = "solo" if shared else mode
    params = LossParams(alpha=1.0 if mode == "solo" else 0.0, beta=2.0)
    g = torch.Generator().manual_seed(long_len)

    def ids(n: int) -> list[int]:  # synthetic ids of exact lengths: the cost depends on lengths only
        return torch.randint(100, 40000, (n,), generator=g).tolist()

    def example(short: int, long: int) -> Example:
        w, lo = ids(comp), ids(comp)
        if mode == "solo":
            s = ids(short)
            return Example("x", Seq(s, w), Seq(s, lo), Seq(ids(long), w))
        x = ids(long)
        return Example("x", Seq(x, w), Seq(x, lo), None)

    def mem_now() -> float:
        return torch.cuda.memory_allocated() / 2**30 if cuda else _status_kib("VmRSS") / 2**20

    def reset_peak() -> bool:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            return True
        return _reset_peak_rss()

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else _status_kib("VmHWM") / 2**20

    def step(ex: Example) -> dict:
        """One optimizer step; the peak mark is reset at its start, read after backward and at the end."""
        base = mem_now()
        reset = reset_peak()
        t0 = time.perf_counter()
        batch, tokens = micro_batch_logps(module, [ex], 2, mode == "solo", False, dev, shared_prefix=shared)
        OBJECTIVES[algo](batch, params).loss.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        fb, fb_peak = time.perf_counter() - t0, peak()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return {"tokens": tokens, "fb": fb, "s": time.perf_counter() - t0, "base": base, "fb_peak": fb_peak,
                "peak": peak(), "reset": reset}

    t0 = time.perf_counter()
    step(example(min(short_len, warmup_len), min(long_len, warmup_len)))
    warmup_s = time.perf_counter() - t0
    ex = example(short_len, long_len)
    runs: list[dict] = []
    while len(runs) < steps or (len(runs) < max_steps and sum(r["s"] for r in runs) < min_seconds):
        runs.append(step(ex))
    base_gb = runs[0]["base"]
    fb_peak = max(r["fb_peak"] for r in runs)
    peak_gb = max(r["peak"] for r in runs)
    return {"mode": "solo-shared" if shared else mode, "long_len": long_len, "short_len": short_len,
            "completion": comp, "tokens": runs[0]["tokens"], "step_s": statistics.median(r["s"] for r in runs),
            "step_times": [round(r["s"], 3) for r in runs], "fwd_bwd_s": statistics.median(r["fb"] for r in runs),
            "threads": torch.get_num_threads(), "warmup_s": warmup_s, "base_gb": base_gb,
            "fwd_bwd_peak_gb": fb_peak, "fwd_bwd_rise_gb": fb_peak - base_gb,
            "step_peak_gb": peak_gb, "step_rise_gb": peak_gb - base_gb, "peak_reset": all(r["reset"] for r in runs),
            "device": dev.type}


MODES = ("solo", "long", "solo-shared")


# --- parent: one child per measurement --------------------------------------------------------------------
def run_child(script: Path, argv: list[str], pythonpath: str, log_path: Path, threads: int,
              mmap_threshold: int) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if mmap_threshold:
        # A fixed threshold turns off glibc's dynamic one (which rises to 32 MiB after the first large free, so
        # mid-size tensors then stay in the heap and RSS depends on fragmentation: long at 8K read less than at 4K).
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with open(log_path, "w") as err:
        p = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE,
                             stderr=err, text=True, env=env)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"child {argv} failed ({p.returncode}):\n{log_path.read_text()[-3000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    r["process_peak_gb"] = usage.ru_maxrss / 2**20
    return r


def summarize(rows: list[dict], lengths: list[int], short: int, comp: int) -> list[dict]:
    table = []
    for L in lengths:
        s = next(r for r in rows if r["mode"] == "solo" and r["long_len"] == L)
        g = next(r for r in rows if r["mode"] == "long" and r["long_len"] == L)
        rho = short / L
        rho_seq = (short + comp) / (L + comp)
        table.append({
            "long_len": L, "rho": round(rho, 3),
            "solo_step_s": round(s["step_s"], 2), "long_step_s": round(g["step_s"], 2),
            "time_ratio": round(s["step_s"] / g["step_s"], 3),
            "solo_fwd_bwd_s": round(s["fwd_bwd_s"], 2), "long_fwd_bwd_s": round(g["fwd_bwd_s"], 2),
            "fwd_bwd_ratio": round(s["fwd_bwd_s"] / g["fwd_bwd_s"], 3),
            "predicted_ratio": round((2 * rho**2 + 1) / 2, 3), "token_ratio": round((2 * rho_seq + 1) / 2, 3),
            "solo_peak_gb": round(s["step_peak_gb"], 2), "long_peak_gb": round(g["step_peak_gb"], 2),
            "mem_ratio": round(s["step_peak_gb"] / g["step_peak_gb"], 3),
            "solo_rise_gb": round(s["fwd_bwd_rise_gb"], 2), "long_rise_gb": round(g["fwd_bwd_rise_gb"], 2),
            "rise_ratio": round(s["fwd_bwd_rise_gb"] / g["fwd_bwd_rise_gb"], 3) if g["fwd_bwd_rise_gb"] > 0 else None,
            "solo_process_peak_gb": round(s["process_peak_gb"], 2), "long_process_peak_gb": round(g["process_peak_gb"], 2),
            "solo_timed_steps": len(s["step_times"]), "long_timed_steps": len(g["step_times"]),
        })
    return table


def write_pair(rows: list[dict], lengths: list[int], modes: list[str], meta: dict, stem: Path) -> None:
    """A candidate mode against a baseline mode (e.g. solo-shared vs solo) measured in this run."""
    cand, base = modes
    table = []
    for L in lengths:
        c = next(r for r in rows if r["mode"] == cand and r["long_len"] == L)
        b = next(r for r in rows if r["mode"] == base and r["long_len"] == L)
        table.append({
            "long_len": L, f"{cand}_tokens": c["tokens"], f"{base}_tokens": b["tokens"],
            "token_ratio": round(c["tokens"] / b["tokens"], 3),
            f"{cand}_step_s": round(c["step_s"], 2), f"{base}_step_s": round(b["step_s"], 2),
            "time_ratio": round(c["step_s"] / b["step_s"], 3), "fwd_bwd_ratio": round(c["fwd_bwd_s"] / b["fwd_bwd_s"], 3),
            f"{cand}_peak_gb": round(c["step_peak_gb"], 2), f"{base}_peak_gb": round(b["step_peak_gb"], 2),
            "mem_ratio": round(c["step_peak_gb"] / b["step_peak_gb"], 3),
            f"{cand}_rise_gb": round(c["fwd_bwd_rise_gb"], 2), f"{base}_rise_gb": round(b["fwd_bwd_rise_gb"], 2),
            "rise_ratio": round(c["fwd_bwd_rise_gb"] / b["fwd_bwd_rise_gb"], 3) if b["fwd_bwd_rise_gb"] > 0 else None,
        })
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": table}, indent=2) + "\n")
    lines = [
        f"# bench/train: `{cand}` vs `{base}`, one run, one machine", "",
        f"`{meta['command']}` (git {meta['git']}), {meta['wall_minutes']} min wall. {meta['model']}; algo "
        f"{meta['algo']}; short prompt {meta['short_len']} tokens, completion {meta['completion']}; {meta['machine']}, "
        f"{meta['cpus']} CPUs (load average {' '.join(meta['load_avg_at_end'])} at the end), "
        f"{meta['threads_per_child']} torch thread(s) per child.", "",
        f"Timing: {meta['timing']}. Memory: {meta['memory']}.", "",
        "solo-shared = solo with train.shared_prefix=true: the short prompt is computed once for chosen and rejected "
        "(one packed row, block-causal mask, the rejected answer's positions restart after the prompt); the "
        "long+chosen RA forward is unchanged. Log-probs and gradients equal the padded pair's "
        "(tests/test_train_shared_prefix.py).", "",
        f"| long len | {cand} tokens | {base} tokens | token ratio | {cand} s/step | {base} s/step | **time ratio** | "
        f"fwd+bwd ratio | {cand} step peak GiB | {base} step peak GiB | **peak ratio** | {cand} fwd+bwd rise GiB | "
        f"{base} fwd+bwd rise GiB | **fwd+bwd rise ratio** |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        lines.append(
            f"| {t['long_len']} | {t[f'{cand}_tokens']} | {t[f'{base}_tokens']} | {t['token_ratio']} | "
            f"{t[f'{cand}_step_s']} | {t[f'{base}_step_s']} | **{t['time_ratio']}** | {t['fwd_bwd_ratio']} | "
            f"{t[f'{cand}_peak_gb']} | {t[f'{base}_peak_gb']} | **{t['mem_ratio']}** | {t[f'{cand}_rise_gb']} | "
            f"{t[f'{base}_rise_gb']} | **{t['rise_ratio']}** |"
        )
    lines += ["", "Ratios are candidate / baseline from this run; below 1 = the candidate is faster / leaner."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [t["long_len"] for t in table]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(x, [t["solo_step_s"] for t in table], "o-", label="solo (SoLoPO)")
    ax[0].plot(x, [t["long_step_s"] for t in table], "s-", label="long (Long-PO)")
    ax[0].set_ylabel("seconds / step (median)")
    ax[1].plot(x, [t["solo_peak_gb"] for t in table], "o-", label="solo: peak of the timed steps (incl. AdamW)")
    ax[1].plot(x, [t["long_peak_gb"] for t in table], "s-", label="long: peak of the timed steps (incl. AdamW)")
    ax[1].plot(x, [t["solo_rise_gb"] for t in table], "o--", label="solo: fwd+bwd rise over pre-step memory")
    ax[1].plot(x, [t["long_rise_gb"] for t in table], "s--", label="long: fwd+bwd rise over pre-step memory")
    ax[1].set_ylabel("GiB")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xticks(x, [f"{v // 1024}K" for v in x])
        a.set_xlabel("long prompt tokens (short fixed)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier_run_note(path: Path) -> list[str]:
    """Why the children fix the allocator threshold, with the numbers of the run that showed it (if kept)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())["summary"]
    peaks = ", ".join(f"{t['long_len'] // 1024}K {t['long_peak_gb']}" for t in old)
    times = " / ".join(str(t["time_ratio"]) for t in old)
    return [
        f"Why the allocator setting: an earlier run of this script with glibc's dynamic mmap threshold (fresh child "
        f"per measurement; raw data in {path.name}) read `long`'s step peak RSS (GiB) as {peaks}: not monotone in "
        "length. After the first large free glibc raises its mmap threshold to 32 MiB, so tensors under 32 MiB (most "
        "activations at 4K) come from a heap that fragments and is not returned, while at 8K with batch 2 most exceed "
        "32 MiB and are unmapped on free: the RSS peak measured the allocator, not the step. That run's solo/long "
        f"time ratios: {times}.", "",
    ]


def write_main(rows: list[dict], meta: dict, out: Path) -> None:
    """The solo-vs-long table, JSON, Markdown and PNG (also re-rendered from a results.json with --render)."""
    lengths = sorted({r["long_len"] for r in rows})
    short, comp, load = meta["short_len"], meta["completion"], meta["load_avg_at_end"]
    table = summarize(rows, lengths, short, comp)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": table}, indent=2) + "\n")
    plot(table, out / "results.png", f"solo vs long, {meta['model']}, short {short}, completion {comp}")
    lines = [
        "# bench/train: SoLoPO (`solo`) vs Long-PO (`long`), one run, one machine", "",
        f"`{meta['command']}` (git {meta['git']}), {meta['wall_minutes']} min wall.", "",
        f"{meta['model']}; algo {meta['algo']}; short prompt {short} tokens, completion {comp} tokens, one example "
        f"per step (solo: short+chosen and short+rejected in one padded forward, long+chosen in a second; long: "
        f"long+chosen and long+rejected in one); AdamW step included; synthetic ids of exact lengths. "
        f"{meta['machine']}, {meta['cpus']} CPUs (shared with other jobs, load average {' '.join(load)} at the end), "
        f"torch {meta['torch']}, device {meta['device']}, {meta['threads_per_child'] or 'default'} torch thread(s) per child.", "",
        f"Timing: {meta['timing']}. Memory: {meta['memory']}; children run with MALLOC_MMAP_THRESHOLD_="
        f"{meta.get('malloc_mmap_threshold') or 'unset (glibc dynamic)'}.", "",
        "| long len | rho | solo s/step | long s/step | **solo/long time** | solo/long fwd+bwd | predicted "
        "(2rho^2+1)/2 | token ratio "
        "| solo step peak GiB | long step peak GiB | **solo/long peak** | solo fwd+bwd rise GiB | long fwd+bwd rise GiB "
        "| **solo/long fwd+bwd rise** | solo / long process peak GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        lines.append(
            f"| {t['long_len']} | {t['rho']} | {t['solo_step_s']} ({t['solo_timed_steps']}) | {t['long_step_s']} "
            f"({t['long_timed_steps']}) | **{t['time_ratio']}** | {t['fwd_bwd_ratio']} | {t['predicted_ratio']} | {t['token_ratio']} | "
            f"{t['solo_peak_gb']} | {t['long_peak_gb']} | **{t['mem_ratio']}** | {t['solo_rise_gb']} | "
            f"{t['long_rise_gb']} | **{t['rise_ratio']}** | {t['solo_process_peak_gb']} / {t['long_process_peak_gb']} |"
        )
    lines += [
        "", "(n) after a step time = timed steps in the median; a step is forward + backward + grad clip + AdamW, "
        "fwd+bwd excludes the optimizer (a fixed cost per step, amortized over grad_accum micro-batches in real "
        "training). Ratios below 1 mean solo is faster / leaner. The rise includes the fp32 gradients (0.5 GiB for "
        "135M parameters, freed between steps) besides activations and temporaries. "
        "rho = |x_short| / |x_long| (prompts); the token ratio (2 rho' + 1) / 2 uses whole sequences (prompt + "
        "completion) and is what a cost linear in tokens would give. The paper's model counts only the "
        "attention-quadratic term; a 135M model at these lengths also spends much of each step in per-token "
        "projections and MLPs, whose cost is linear in tokens.", "",
        *_earlier_run_note(out / "results_glibc_dynamic_threshold.json"),
        "TRL's DPOTrainer/CPOTrainer on the long prompts was not measured in this run (a third column would add "
        "about as much time as the `long` column, beyond this machine's ~20-minute budget); the peer tests "
        "(tests/test_peer_trl.py) check loss equality with TRL, not its speed.", "",
        "![step time and peak memory vs length](results.png)",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("MODE", "LONG_LEN"), help="run one measurement in this process")
    ap.add_argument("--lengths", default="1k,2k,4k,8k")
    ap.add_argument("--short", default="1k")
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed steps at least (median reported)")
    ap.add_argument("--max-steps", type=int, default=3, help="timed steps at most")
    ap.add_argument("--min-seconds", type=float, default=30.0, help="add timed steps while their total is below")
    ap.add_argument("--warmup-len", type=int, default=256, help="prompt tokens of the warm-up step's example")
    ap.add_argument("--algo", default="simpo")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per child (0 = torch default); 1 is faster on a CPU shared with other jobs")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20,
                    help="MALLOC_MMAP_THRESHOLD_ for the children (bytes; 0 = glibc's dynamic default): allocations "
                         "above it are returned to the OS when freed, so peak RSS follows live tensor memory")
    ap.add_argument("--modes", default="solo,long",
                    help="candidate,baseline: solo,long (the main table) or e.g. solo-shared,solo (train.shared_prefix)")
    ap.add_argument("--tag", default="", help="write results_<tag>.* instead of results.*")
    ap.add_argument("--render", default=None, help="rewrite results.md/.png from this results JSON (no measuring)")
    a = ap.parse_args()
    if a.render:
        data = json.loads(Path(a.render).read_text())
        write_main(data["rows"], data["meta"], Path(a.render).parent)
        return
    from solopo.pipeline.config import parse_length, parse_lengths

    short = parse_length(a.short)
    knobs = {"short_len": short, "comp": a.completion, "steps": a.steps, "max_steps": max(a.steps, a.max_steps),
             "min_seconds": a.min_seconds, "warmup_len": a.warmup_len, "algo": a.algo,
             "threads": a.threads}
    if a.one:
        mode, L = a.one
        if mode not in MODES:
            raise SystemExit(f"--one MODE: one of {MODES}")
        print(json.dumps(one(mode, parse_length(L), **knobs)))
        return

    lengths = parse_lengths(a.lengths)
    modes = a.modes.split(",")
    if len(modes) != 2 or not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: two of {MODES}, candidate first")
    snap = Path(tempfile.mkdtemp(prefix="bench_train_"))
    shutil.copytree(REPO / "solopo", snap / "solopo", ignore=shutil.ignore_patterns("__pycache__"))
    script = Path(shutil.copy2(Path(__file__).resolve(), snap / "bench_train.py"))
    passthrough = ["--short", str(short), "--completion", str(a.completion), "--steps", str(a.steps),
                   "--max-steps", str(a.max_steps), "--min-seconds", str(a.min_seconds),
                   "--warmup-len", str(a.warmup_len), "--algo", a.algo, "--threads", str(a.threads)]
    rows = []
    t_run = time.time()
    try:
        for L in lengths:
            for mode in modes:
                t0 = time.time()
                r = run_child(script, ["--one", mode, str(L), *passthrough], str(snap), snap / f"{mode}-{L}.log",
                              a.threads, a.mmap_threshold)
                rows.append(r)
                print(f"{mode:11s} long={L:5d}: {r['step_s']:7.2f} s/step (median of {r['step_times']}), step peak "
                      f"{r['step_peak_gb']:.2f} GiB (fwd+bwd +{r['fwd_bwd_rise_gb']:.2f}), process peak {r['process_peak_gb']:.2f}"
                      f" GiB [{time.time() - t0:.0f}s wall]", flush=True)
    finally:
        shutil.rmtree(snap, ignore_errors=True)

    import torch

    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    meta = {
        "command": "python3 bench/train/bench_train.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_end": load, "torch": torch.__version__,
        "device": rows[0]["device"], "git": git.stdout.strip(),
        "model": "SmolLM2-135M-Instruct (embedded), fp32, sdpa, gradient checkpointing, logps chunk 1024",
        "algo": a.algo, "threads_per_child": a.threads, "malloc_mmap_threshold": a.mmap_threshold, "short_len": short, "completion": a.completion,
        "timing": f"1 warm-up step on a {a.warmup_len}-token example, then >= {a.steps} timed full-size steps "
                  f"(up to {a.max_steps} while under {a.min_seconds:.0f} s), median",
        "memory": "per fresh child, peak mark (VmHWM; CUDA: max_memory_allocated) reset at the start of each timed "
                  "step: step peak = the max over the steps (forward, backward, clip, AdamW), fwd+bwd rise = the "
                  "peak at the end of backward minus the memory before the step (activations, gradients, "
                  "temporaries), process peak = the child's ru_maxrss (os.wait4)",
        "wall_minutes": round((time.time() - t_run) / 60, 1),
    }
    out = Path(a.out)
    if modes != ["solo", "long"]:
        write_pair(rows, lengths, modes, meta, out / f"results_{a.tag or '_'.join(modes)}")
    else:
        write_main(rows, meta, out)



if __name__ == "__main__":
    main()
