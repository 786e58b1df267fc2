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
    sys.path.append(str(REPO))
if str(HERE) not in sys.path:
    sys.path.append(
        str(HERE)
    )  # shapes.py (the children run a snapshot copy that has it beside them)  # appended: a child's PYTHONPATH (the snapshot) comes first


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


def one(
    mode: str,
    long_len: int,
    short_len: int,
    comp: int,
    steps: int,
    max_steps: int,
    min_seconds: float,
    warmup_len: int,
    algo: str,
    threads: int,
    shape: str = "embedded",
    mask: str = "none",
    cap_gb: float = 0.0,
    probe: bool = False,
    search: tuple[int, int, int] | None = None,
) -> dict:
    """One (mode, length) in this process. `probe`: one full step, no warm-up, OOM reported instead of raised
    (the max-length search); `cap_gb` caps the CUDA allocator (set_per_process_memory_fraction). `search`
    (start, step, limit), CUDA only: the whole max-length search in this process, one model, OOMs caught."""
    import torch
    from shapes import build, counts

    from solopo.training.data import Example, Seq
    from solopo.training.logprobs import CompletionLogps, use_segment_attention
    from solopo.training.loop.step import micro_batch_logps
    from solopo.training.losses import OBJECTIVES, LossParams

    cuda = torch.cuda.is_available()
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda and cap_gb:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        )
    dtype = torch.bfloat16 if cuda else torch.float32
    lm = build(shape, dev, dtype, max_positions=max(32768, 2 * long_len + 4 * comp))
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shared = mode.endswith("-shared")  # train.shared_prefix=true: [prompt, chosen, rejected] in one packed row
    if shared and mask == "none":
        use_segment_attention(lm)  # segments, no (b, 1, s, s) mask; mask=dense keeps today's dense float mask
    module = CompletionLogps(lm, chunk_size=1024).to(dev).train()
    fused = {"fused": True} if cuda else {}
    opt = torch.optim.AdamW(module.parameters(), lr=1e-7, **fused)
    base_mode = mode.removesuffix("-shared")
    params = LossParams(alpha=1.0 if base_mode == "solo" else 0.0, beta=2.0)
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(long_len)
    pad = 2

    def ids(n: int) -> list[int]:  # synthetic ids of exact lengths: the cost depends on lengths only
        return torch.randint(100, min(40000, vocab), (n,), generator=g).tolist()

    def example(short: int, long: int) -> Example:
        # the rejected answer is a quarter shorter: real pairs differ in length, so the pair batch is padded
        w, lo = ids(comp), ids(comp - comp // 4)
        if base_mode == "solo":
            x = ids(short)
            return Example("x", Seq(x, w), Seq(x, lo), Seq(ids(long), w))
        x = ids(long)
        return Example("x", Seq(x, w), Seq(x, lo), None)

    def forward(input_ids, attention_mask, targets, *rest):
        if mask == "dense" and attention_mask is None and not rest:  # today's padded pair: a padding mask
            attention_mask = (input_ids != pad).long()  # transformers expands it to (b, 1, s, s)
        return module(input_ids, attention_mask, targets, *rest)

    def mem_now() -> float:
        return torch.cuda.memory_allocated() / 2**30 if cuda else _status_kib("VmRSS") / 2**20

    def reset_peak() -> bool:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            return True
        return _reset_peak_rss()

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else _status_kib("VmHWM") / 2**20

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(ex: Example) -> dict:
        """One optimizer step; the peak mark is reset at its start, read after backward and at the end."""
        base = mem_now()
        reset = reset_peak()
        t0 = time.perf_counter()
        batch, tokens = micro_batch_logps(forward, [ex], pad, base_mode == "solo", False, dev, shared_prefix=shared)
        OBJECTIVES[algo](batch, params).loss.sum().backward()
        sync()
        fb, fb_peak = time.perf_counter() - t0, peak()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return {
            "tokens": tokens,
            "fb": fb,
            "s": time.perf_counter() - t0,
            "base": base,
            "fb_peak": fb_peak,
            "peak": peak(),
            "reset": reset,
        }

    gib = 2**30
    weights_gb = sum(p.numel() * p.element_size() for p in lm.parameters()) / gib
    grads_gb = sum(p.numel() * p.element_size() for p in lm.parameters() if p.requires_grad) / gib
    info = {
        "mode": mode,
        "long_len": long_len,
        "short_len": short_len,
        "completion": comp,
        "shape": shape,
        "mask": mask,
        "dtype": str(dtype).removeprefix("torch."),
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "params": counts(lm)["total"],
        "weights_gb": weights_gb,
        "grads_gb": grads_gb,
    }

    def try_len(L: int) -> dict:
        try:
            r = step(example(short_len, L))
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
            return {**info, "long_len": L, "oom": True, "ok": False}
        return {
            **info,
            "long_len": L,
            "oom": False,
            "ok": True,
            "step_s": r["s"],
            "step_peak_gb": r["peak"],
            "tokens": r["tokens"],
        }

    if search:
        return {**info, **search_max_length(lambda _m, L: try_len(L), mode, *search)}
    if probe:
        return try_len(long_len)
    t0 = time.perf_counter()
    step(example(min(short_len, warmup_len), min(long_len, warmup_len)))
    warmup_s = time.perf_counter() - t0
    optim_gb = (
        sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)) / gib
    )
    ex = example(short_len, long_len)
    runs: list[dict] = []
    while len(runs) < steps or (len(runs) < max_steps and sum(r["s"] for r in runs) < min_seconds):
        runs.append(step(ex))
    base_gb = runs[0]["base"]
    fb_peak = max(r["fb_peak"] for r in runs)
    peak_gb = max(r["peak"] for r in runs)
    return {
        **info,
        "tokens": runs[0]["tokens"],
        "step_s": statistics.median(r["s"] for r in runs),
        "step_times": [round(r["s"], 3) for r in runs],
        "fwd_bwd_s": statistics.median(r["fb"] for r in runs),
        "threads": torch.get_num_threads(),
        "warmup_s": warmup_s,
        "base_gb": base_gb,
        "optim_gb": optim_gb,
        "fwd_bwd_peak_gb": fb_peak,
        "fwd_bwd_rise_gb": fb_peak - base_gb,
        # activations + temporaries: the fwd+bwd peak minus weights, optimizer state (both in base) and grads
        "activation_gb": fb_peak - base_gb - grads_gb,
        "step_peak_gb": peak_gb,
        "step_rise_gb": peak_gb - base_gb,
        "peak_reset": all(r["reset"] for r in runs),
    }


MODES = ("solo", "long", "solo-shared", "long-shared")


# --- parent: one child per measurement --------------------------------------------------------------------
def run_child(
    script: Path, argv: list[str], pythonpath: str, log_path: Path, threads: int, mmap_threshold: int
) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if mmap_threshold:
        # A fixed threshold turns off glibc's dynamic one (which rises to 32 MiB after the first large free, so
        # mid-size tensors then stay in the heap and RSS depends on fragmentation: long at 8K read less than at 4K).
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with open(log_path, "w") as err:
        p = subprocess.Popen(
            [sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
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
        table.append(
            {
                "long_len": L,
                "rho": round(rho, 3),
                "solo_step_s": round(s["step_s"], 2),
                "long_step_s": round(g["step_s"], 2),
                "time_ratio": round(s["step_s"] / g["step_s"], 3),
                "solo_fwd_bwd_s": round(s["fwd_bwd_s"], 2),
                "long_fwd_bwd_s": round(g["fwd_bwd_s"], 2),
                "fwd_bwd_ratio": round(s["fwd_bwd_s"] / g["fwd_bwd_s"], 3),
                "predicted_ratio": round((2 * rho**2 + 1) / 2, 3),
                "token_ratio": round((2 * rho_seq + 1) / 2, 3),
                "solo_peak_gb": round(s["step_peak_gb"], 2),
                "long_peak_gb": round(g["step_peak_gb"], 2),
                "mem_ratio": round(s["step_peak_gb"] / g["step_peak_gb"], 3),
                "solo_rise_gb": round(s["fwd_bwd_rise_gb"], 2),
                "long_rise_gb": round(g["fwd_bwd_rise_gb"], 2),
                "rise_ratio": round(s["fwd_bwd_rise_gb"] / g["fwd_bwd_rise_gb"], 3)
                if g["fwd_bwd_rise_gb"] > 0
                else None,
                "solo_process_peak_gb": round(s["process_peak_gb"], 2),
                "long_process_peak_gb": round(g["process_peak_gb"], 2),
                "solo_timed_steps": len(s["step_times"]),
                "long_timed_steps": len(g["step_times"]),
            }
        )
    return table


def write_pair(rows: list[dict], lengths: list[int], modes: list[str], meta: dict, stem: Path) -> None:
    """A candidate mode against a baseline mode (e.g. solo-shared vs solo) measured in this run."""
    cand, base = modes
    table = []
    for L in lengths:
        c = next(r for r in rows if r["mode"] == cand and r["long_len"] == L)
        b = next(r for r in rows if r["mode"] == base and r["long_len"] == L)
        table.append(
            {
                "long_len": L,
                f"{cand}_tokens": c["tokens"],
                f"{base}_tokens": b["tokens"],
                "token_ratio": round(c["tokens"] / b["tokens"], 3),
                f"{cand}_step_s": round(c["step_s"], 2),
                f"{base}_step_s": round(b["step_s"], 2),
                "time_ratio": round(c["step_s"] / b["step_s"], 3),
                "fwd_bwd_ratio": round(c["fwd_bwd_s"] / b["fwd_bwd_s"], 3),
                f"{cand}_peak_gb": round(c["step_peak_gb"], 2),
                f"{base}_peak_gb": round(b["step_peak_gb"], 2),
                "mem_ratio": round(c["step_peak_gb"] / b["step_peak_gb"], 3),
                f"{cand}_rise_gb": round(c["fwd_bwd_rise_gb"], 2),
                f"{base}_rise_gb": round(b["fwd_bwd_rise_gb"], 2),
                "rise_ratio": round(c["fwd_bwd_rise_gb"] / b["fwd_bwd_rise_gb"], 3)
                if b["fwd_bwd_rise_gb"] > 0
                else None,
            }
        )
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": table}, indent=2) + "\n")
    lines = [
        f"# bench/train: `{cand}` vs `{base}`, one run, one machine",
        "",
        f"`{meta['command']}` (git {meta['git']}), {meta['wall_minutes']} min wall. {meta['model']}; algo "
        f"{meta['algo']}; short prompt {meta['short_len']} tokens, completion {meta['completion']}; {meta['machine']}, "
        f"{meta['cpus']} CPUs (load average {' '.join(meta['load_avg_at_end'])} at the end), "
        f"{meta['threads_per_child']} torch thread(s) per child.",
        "",
        f"Timing: {meta['timing']}. Memory: {meta['memory']}.",
        "",
        "solo-shared = solo with train.shared_prefix=true: the short prompt is computed once for chosen and rejected "
        "(one packed row, block-causal mask, the rejected answer's positions restart after the prompt); the "
        "long+chosen RA forward is unchanged. Log-probs and gradients equal the padded pair's "
        "(tests/test_train_shared_prefix.py).",
        "",
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
        f"time ratios: {times}.",
        "",
    ]


def write_main(rows: list[dict], meta: dict, out: Path) -> None:
    """The solo-vs-long table, JSON, Markdown and PNG (also re-rendered from a results.json with --render)."""
    lengths = sorted({r["long_len"] for r in rows})
    short, comp, load = meta["short_len"], meta["completion"], meta["load_avg_at_end"]
    table = summarize(rows, lengths, short, comp)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": table}, indent=2) + "\n")
    plot(table, out / "results.png", f"solo vs long, {meta['model']}, short {short}, completion {comp}")
    lines = [
        "# bench/train: SoLoPO (`solo`) vs Long-PO (`long`), one run, one machine",
        "",
        f"`{meta['command']}` (git {meta['git']}), {meta['wall_minutes']} min wall.",
        "",
        f"{meta['model']}; algo {meta['algo']}; short prompt {short} tokens, completion {comp} tokens, one example "
        f"per step (solo: short+chosen and short+rejected in one padded forward, long+chosen in a second; long: "
        f"long+chosen and long+rejected in one); AdamW step included; synthetic ids of exact lengths. "
        f"{meta['machine']}, {meta['cpus']} CPUs (shared with other jobs, load average {' '.join(load)} at the end), "
        f"torch {meta['torch']}, device {meta['device']}, {meta['threads_per_child'] or 'default'} torch thread(s) per child.",
        "",
        f"Timing: {meta['timing']}. Memory: {meta['memory']}; children run with MALLOC_MMAP_THRESHOLD_="
        f"{meta.get('malloc_mmap_threshold') or 'unset (glibc dynamic)'}.",
        "",
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
        "",
        "(n) after a step time = timed steps in the median; a step is forward + backward + grad clip + AdamW, "
        "fwd+bwd excludes the optimizer (a fixed cost per step, amortized over grad_accum micro-batches in real "
        "training). Ratios below 1 mean solo is faster / leaner. The rise includes the fp32 gradients (0.5 GiB for "
        "135M parameters, freed between steps) besides activations and temporaries. "
        "rho = |x_short| / |x_long| (prompts); the token ratio (2 rho' + 1) / 2 uses whole sequences (prompt + "
        "completion) and is what a cost linear in tokens would give. The paper's model counts only the "
        "attention-quadratic term; a 135M model at these lengths also spends much of each step in per-token "
        "projections and MLPs, whose cost is linear in tokens.",
        "",
        *_earlier_run_note(out / "results_glibc_dynamic_threshold.json"),
        "TRL's DPOTrainer/CPOTrainer on the long prompts was not measured in this run (a third column would add "
        "about as much time as the `long` column, beyond this machine's ~20-minute budget); the peer tests "
        "(tests/test_peer_trl.py) check loss equality with TRL, not its speed.",
        "",
        "![step time and peak memory vs length](results.png)",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_modes(rows: list[dict], search: list[dict], meta: dict, stem: Path) -> None:
    """Every mode per length, the solo/long ratios against both baselines (Long-PO, and Long-PO with the shared
    prompt: the stronger one), and the max-trainable-length search: JSON, Markdown and PNG."""
    lengths = sorted({r["long_len"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    get = {(r["mode"], r["long_len"]): r for r in rows}
    pairs = [
        (a, b)
        for a, b in (("solo", "long"), ("solo-shared", "long-shared"), ("solo-shared", "long"))
        if a in modes and b in modes
    ]
    summary = []
    for L in lengths:
        t = {"long_len": L}
        for m in modes:
            r = get.get((m, L))
            if r:
                t.update(
                    {
                        f"{m}_step_s": round(r["step_s"], 3),
                        f"{m}_fwd_bwd_s": round(r["fwd_bwd_s"], 3),
                        f"{m}_activation_gb": round(r["activation_gb"], 3),
                        f"{m}_peak_gb": round(r["step_peak_gb"], 3),
                        f"{m}_tokens": r["tokens"],
                    }
                )
        for a, b in pairs:
            ra, rb = get.get((a, L)), get.get((b, L))
            if ra and rb:
                t[f"{a}/{b}_time"] = round(ra["step_s"] / rb["step_s"], 3)
                t[f"{a}/{b}_fwd_bwd"] = round(ra["fwd_bwd_s"] / rb["fwd_bwd_s"], 3)
                t[f"{a}/{b}_activation"] = (
                    round(ra["activation_gb"] / rb["activation_gb"], 3) if rb["activation_gb"] > 0 else None
                )
        summary.append(t)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "summary": summary, "search": search}, indent=2) + "\n"
    )
    r0 = rows[0] if rows else (search[0].get("first_probe", {}) if search else {})
    lines = [
        f"# bench/train: {meta['shape']} on {meta['device_name']}, one run",
        "",
        f"`{meta['command']}` (git {meta['git']}), {meta['wall_minutes']} min wall; {meta['machine']}, "
        f"{meta['cpus']} CPUs, load average {' '.join(meta['load_avg_at_end'])} at the end; torch {meta['torch']}.",
        "",
        f"Model: {meta['shape']} ({r0.get('params', 0) / 1e9:.3f}B parameters, random weights from its "
        f"config), {r0.get('dtype')}, sdpa, gradient checkpointing, logps chunk 1024, AdamW"
        f"{' (fused)' if meta['device'] == 'cuda' else ''}; algo {meta['algo']}; short prompt {meta['short_len']}, "
        f"completion {meta['completion']} (rejected a quarter shorter), one example per step; masks: "
        f"{meta['mask']} ({'segments / none, no (b,1,s,s) mask' if meta['mask'] == 'none' else 'dense, as before'}).",
        "",
        f"Timing: {meta['timing']}. Memory: {meta['memory']}.",
        "",
    ]
    if rows:
        head = "| long len | " + " | ".join(f"{m} s/step | {m} fwd+bwd s | {m} act GiB | {m} peak GiB" for m in modes)
        lines += [head + " |", "|---:" * (1 + 4 * len(modes)) + "|"]
        for t in summary:
            lines.append(
                f"| {t['long_len']} | "
                + " | ".join(
                    f"{t.get(f'{m}_step_s', '-')} | {t.get(f'{m}_fwd_bwd_s', '-')} | {t.get(f'{m}_activation_gb', '-')} | "
                    f"{t.get(f'{m}_peak_gb', '-')}"
                    for m in modes
                )
                + " |"
            )
        if pairs:
            lines += [
                "",
                "| long len | " + " | ".join(f"**{a} / {b}** time | fwd+bwd | activation" for a, b in pairs) + " |",
                "|---:" * (1 + 3 * len(pairs)) + "|",
            ]
            for t in summary:
                lines.append(
                    f"| {t['long_len']} | "
                    + " | ".join(
                        f"**{t.get(f'{a}/{b}_time', '-')}** | {t.get(f'{a}/{b}_fwd_bwd', '-')} | "
                        f"{t.get(f'{a}/{b}_activation', '-')}"
                        for a, b in pairs
                    )
                    + " |"
                )
        lines += [
            "",
            "act GiB = activation memory: the fwd+bwd peak minus weights, AdamW state and gradients. "
            "long-shared is Long-PO with train.shared_prefix (the long prompt computed once for both answers): "
            "the stronger baseline.",
        ]
    if search:
        lines += [
            "",
            f"Max trainable long-prompt length under a {meta['cap_gb']} GiB cap (one full step; doubling "
            f"from {meta['search_start']}, then bisection to {meta['search_step']} tokens; OOM caught):",
            "",
            "| mode | longest that fits | first that failed | probes |",
            "|---|---:|---:|---|",
        ]
        for r in search:
            lines.append(
                f"| {r['mode']} | {r['fits']} | {r['fails'] or '-'} | "
                + ", ".join(f"{p['long_len']}{'x' if not p['ok'] else ''}" for p in r["probes"])
                + " |"
            )
        by = {r["mode"]: r["fits"] for r in search}
        for a, b in pairs:
            if by.get(a) and by.get(b):
                lines.append(f"\n{a} / {b} max length: **{by[a] / by[b]:.2f}x**")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if rows:
        plot_modes(summary, modes, stem.with_suffix(".png"), f"{meta['shape']} on {meta['device_name']}")
    print("\n".join(lines))


def plot_modes(summary: list[dict], modes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [t["long_len"] for t in summary]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for m, mk in zip(modes, "osv^", strict=False):
        ax[0].plot(x, [t.get(f"{m}_step_s") for t in summary], mk + "-", label=m)
        ax[1].plot(x, [t.get(f"{m}_activation_gb") for t in summary], mk + "-", label=m)
    ax[0].set_ylabel("seconds / step (median)")
    ax[1].set_ylabel("activation GiB (fwd+bwd peak - weights - optimizer - grads)")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xticks(x, [f"{v / 1024:g}K" for v in x])
        a.set_xlabel("long prompt tokens")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def search_max_length(probe, mode: str, start: int, step: int, limit: int) -> dict:
    """Doubling from `start` until a step fails (OOM, or over the cap), then bisection to `step` tokens."""
    probes, first = [], []

    def ok(L: int) -> bool:
        r = probe(mode, L)
        if not first:
            first.append({k: r.get(k) for k in ("params", "dtype", "device", "device_name", "weights_gb")})
        probes.append({"long_len": L, "ok": r["ok"], "peak_gb": r.get("step_peak_gb"), "step_s": r.get("step_s")})
        print(f"search {mode:11s} {L:7d}: {'fits' if r['ok'] else 'FAILS'} {r.get('step_peak_gb') or ''}", flush=True)
        return r["ok"]

    lo, hi = 0, None
    L = start
    while L <= limit:
        if ok(L):
            lo, L = L, L * 2
        else:
            hi = L
            break
    if lo == 0 and hi is not None:  # even the start failed: halve down
        L = hi // 2
        while L >= step and not ok(L):
            hi, L = L, L // 2
        lo = L if L >= step else 0
    while hi is not None and hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {"mode": mode, "fits": lo, "fails": hi, "probes": probes, "first_probe": first[0] if first else {}}


def main() -> None:
    if "--throughput" in sys.argv[1:]:  # its own options (bench/train/throughput.py)
        import throughput

        throughput.main([x for x in sys.argv[1:] if x != "--throughput"])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("MODE", "LONG_LEN"), help="run one measurement in this process")
    ap.add_argument("--probe", action="store_true", help="with --one: one step, report OOM instead of failing")
    ap.add_argument("--search-child", action="store_true", help="with --one MODE START: the search in-process")
    ap.add_argument(
        "--shape",
        default=None,
        help="embedded | qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b | qwen2-tiny "
        "(random weights from the config); given, results go to results_<shape>[_<tag>].*",
    )
    ap.add_argument(
        "--mask",
        default="none",
        choices=["none", "dense"],
        help="none: no (b,1,s,s) mask (segments for shared modes); dense: the previous dense masks",
    )
    ap.add_argument(
        "--cap-gb",
        type=float,
        default=0.0,
        help="memory cap for the max-length search (CUDA: "
        "allocator fraction; CPU: the child's peak RSS is compared with it)",
    )
    ap.add_argument("--search", default="", help="modes whose max trainable length to search, e.g. solo,long")
    ap.add_argument("--search-start", default="8k")
    ap.add_argument("--search-step", default="1k")
    ap.add_argument("--search-limit", default="256k")
    ap.add_argument(
        "--throughput",
        action="store_true",
        help="tokens/s, MFU and a torch.profiler breakdown of the training step (bench/train/throughput.py)",
    )
    ap.add_argument("--lengths", default="1k,2k,4k,8k")
    ap.add_argument("--short", default="1k")
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="timed steps at least (median reported)")
    ap.add_argument("--max-steps", type=int, default=3, help="timed steps at most")
    ap.add_argument("--min-seconds", type=float, default=30.0, help="add timed steps while their total is below")
    ap.add_argument("--warmup-len", type=int, default=256, help="prompt tokens of the warm-up step's example")
    ap.add_argument("--algo", default="simpo")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per child (0 = torch default); 1 is faster on a CPU shared with other jobs",
    )
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=1 << 20,
        help="MALLOC_MMAP_THRESHOLD_ for the children (bytes; 0 = glibc's dynamic default): allocations "
        "above it are returned to the OS when freed, so peak RSS follows live tensor memory",
    )
    ap.add_argument(
        "--modes",
        default="solo,long",
        help="candidate,baseline: solo,long (the main table) or e.g. solo-shared,solo (train.shared_prefix); "
        "with --shape: any of solo,long,solo-shared,long-shared",
    )
    ap.add_argument("--tag", default="", help="write results_<tag>.* instead of results.*")
    ap.add_argument("--render", default=None, help="rewrite results.md/.png from this results JSON (no measuring)")
    a = ap.parse_args()
    if a.render:
        data = json.loads(Path(a.render).read_text())
        write_main(data["rows"], data["meta"], Path(a.render).parent)
        return
    from solopo.pipeline.config import parse_length, parse_lengths

    short = parse_length(a.short)
    knobs = {
        "short_len": short,
        "comp": a.completion,
        "steps": a.steps,
        "max_steps": max(a.steps, a.max_steps),
        "min_seconds": a.min_seconds,
        "warmup_len": a.warmup_len,
        "algo": a.algo,
        "threads": a.threads,
        "shape": a.shape or "embedded",
        "mask": a.mask,
        "cap_gb": a.cap_gb,
    }
    if a.one:
        mode, L = a.one
        if mode not in MODES:
            raise SystemExit(f"--one MODE: one of {MODES}")
        search = None
        if a.search_child:
            search = (parse_length(L), parse_length(a.search_step), parse_length(a.search_limit))
        print(json.dumps(one(mode, parse_length(L), probe=a.probe, search=search, **knobs)))
        return

    lengths = parse_lengths(a.lengths) if a.lengths else []
    modes = a.modes.split(",") if a.modes else []
    if not set(modes) <= set(MODES) or (a.shape is None and len(modes) != 2):
        raise SystemExit(f"--modes: two of {MODES}, candidate first (any of them with --shape)")
    search_modes = [m for m in a.search.split(",") if m]
    if not set(search_modes) <= set(MODES):
        raise SystemExit(f"--search: modes among {MODES}")
    snap = Path(tempfile.mkdtemp(prefix="bench_train_"))
    shutil.copytree(REPO / "solopo", snap / "solopo", ignore=shutil.ignore_patterns("__pycache__"))
    script = Path(shutil.copy2(Path(__file__).resolve(), snap / "bench_train.py"))
    shutil.copy2(HERE / "shapes.py", snap / "shapes.py")
    passthrough = [
        "--short",
        str(short),
        "--completion",
        str(a.completion),
        "--steps",
        str(a.steps),
        "--max-steps",
        str(a.max_steps),
        "--min-seconds",
        str(a.min_seconds),
        "--warmup-len",
        str(a.warmup_len),
        "--algo",
        a.algo,
        "--threads",
        str(a.threads),
        "--shape",
        a.shape or "embedded",
        "--mask",
        a.mask,
        "--cap-gb",
        str(a.cap_gb),
    ]
    rows, search = [], []
    t_run = time.time()

    def probe(mode: str, L: int) -> dict:
        try:
            r = run_child(
                script,
                ["--one", mode, str(L), "--probe", *passthrough],
                str(snap),
                snap / f"probe-{mode}-{L}.log",
                a.threads,
                a.mmap_threshold,
            )
        except SystemExit as e:  # killed (the CPU OOM killer) or crashed: does not fit, say why
            return {"ok": False, "error": str(e)[-300:]}
        over_cap = a.cap_gb and r["device"] == "cpu" and r["process_peak_gb"] > a.cap_gb
        return {**r, "ok": not r["oom"] and not over_cap}

    try:
        for L in lengths:
            for mode in modes:
                t0 = time.time()
                r = run_child(
                    script,
                    ["--one", mode, str(L), *passthrough],
                    str(snap),
                    snap / f"{mode}-{L}.log",
                    a.threads,
                    a.mmap_threshold,
                )
                rows.append(r)
                print(
                    f"{mode:11s} long={L:5d}: {r['step_s']:7.2f} s/step (median of {r['step_times']}), step peak "
                    f"{r['step_peak_gb']:.2f} GiB (fwd+bwd +{r['fwd_bwd_rise_gb']:.2f}, activations "
                    f"{r['activation_gb']:.2f}), process peak {r['process_peak_gb']:.2f} GiB [{time.time() - t0:.0f}s wall]",
                    flush=True,
                )
        import torch

        for mode in search_modes:
            if torch.cuda.is_available():  # OOM is catchable: one child per mode, the model built once
                search.append(
                    run_child(
                        script,
                        [
                            "--one",
                            mode,
                            a.search_start,
                            "--search-child",
                            "--search-step",
                            a.search_step,
                            "--search-limit",
                            a.search_limit,
                            *passthrough,
                        ],
                        str(snap),
                        snap / f"search-{mode}.log",
                        a.threads,
                        a.mmap_threshold,
                    )
                )
            else:  # CPU: a fresh child per probe, its peak RSS compared with the cap
                search.append(
                    search_max_length(
                        probe,
                        mode,
                        parse_length(a.search_start),
                        parse_length(a.search_step),
                        parse_length(a.search_limit),
                    )
                )
    finally:
        shutil.rmtree(snap, ignore_errors=True)

    import torch

    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    meta = {
        "command": "python3 bench/train/bench_train.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_at_end": load,
        "torch": torch.__version__,
        "device": rows[0]["device"] if rows else ("cuda" if torch.cuda.is_available() else "cpu"),
        "device_name": rows[0]["device_name"]
        if rows
        else (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "git": git.stdout.strip(),
        "shape": a.shape or "embedded",
        "mask": a.mask,
        "cap_gb": a.cap_gb,
        "search_start": a.search_start,
        "search_step": a.search_step,
        "model": "SmolLM2-135M-Instruct (embedded), fp32, sdpa, gradient checkpointing, logps chunk 1024",
        "algo": a.algo,
        "threads_per_child": a.threads,
        "malloc_mmap_threshold": a.mmap_threshold,
        "short_len": short,
        "completion": a.completion,
        "timing": f"1 warm-up step on a {a.warmup_len}-token example, then >= {a.steps} timed full-size steps "
        f"(up to {a.max_steps} while under {a.min_seconds:.0f} s), median",
        "memory": "per fresh child, peak mark (VmHWM; CUDA: max_memory_allocated) reset at the start of each timed "
        "step: step peak = the max over the steps (forward, backward, clip, AdamW), fwd+bwd rise = the "
        "peak at the end of backward minus the memory before the step (activations, gradients, "
        "temporaries), process peak = the child's ru_maxrss (os.wait4)",
        "wall_minutes": round((time.time() - t_run) / 60, 1),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.shape is not None:
        write_modes(rows, search, meta, out / f"results_{a.shape}{'_' + a.tag if a.tag else ''}")
    elif modes != ["solo", "long"]:
        write_pair(rows, lengths, modes, meta, out / f"results_{a.tag or '_'.join(modes)}")
    else:
        write_main(rows, meta, out)


if __name__ == "__main__":
    main()
