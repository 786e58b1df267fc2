"""Full fine-tuning vs LoRA (train.peft=lora): step time and peak memory of SoLo-DPO on the embedded SmolLM2-135M
through the real training loop (solopo.training.loop.trainer.train), in one run.

    python3 bench/train/bench_lora.py [--short 512] [--long 2k] [--steps 4] [--r 16]

Each variant runs in its own fresh child process (no heap inherited from the other), in the order given by
`--order` (default full,lora, then the reverse: both orders, so drift in the machine's load shows). Per child:
the median step time over the steps after the first (the first holds thread-pool start and AdamW state
allocation), the process's peak RSS after the last step (ru_maxrss: weights, gradients, AdamW state,
activations; on CUDA torch's max_memory_allocated), the trainable parameters. The load average is read before
and after every child. Writes results_lora.json and results_lora.md next to this file and prints LoRA/full ratios
measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rows(n: int, short: int, long: int, tokenizer) -> list[dict]:
    """Export-shaped triplets whose short / long prompts are about `short` / `long` tokens of the model."""
    filler = "The committee met again and discussed the annual report in detail. "
    per = len(tokenizer(filler).input_ids)
    out = []
    for i in range(n):
        doc = f"Document 1: Item {i} was made in Lyon, France."
        q = f"Question: Where was item {i} made?"
        out.append(
            {
                "id": f"q{i}",
                "target_len": long,
                "short_prompt": filler * max(1, short // per) + f"{doc}\n\n{q}",
                "long_prompt": filler * max(1, long // per) + f"{doc}\n\n{q}",
                "chosen_response": f"Item {i} was made in Lyon, as document 1 says. The answer is: Lyon",
                "rejected_response": f"Item {i} was probably made in Paris, the capital. The answer is: Paris",
            }
        )
    return out


def child(variant: str, args) -> dict:
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer

    from solopo.models import resolve_model
    from solopo.training.config import TrainConfig
    from solopo.training.loop.settings import count_parameters
    from solopo.training.loop.trainer import train

    torch.set_num_threads(args.threads)
    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    cfg = TrainConfig(
        algo="dpo",
        mode="solo",
        max_steps=args.steps,
        micro_batch_size=1,
        grad_accum=1,
        lr=1e-5,
        gradient_checkpointing=False,
        logps_chunk=512,
        peft="lora" if variant == "lora" else "none",
        lora={"r": args.r, "alpha": 2.0 * args.r},
        merge_adapter=False,
    )
    with tempfile.TemporaryDirectory() as out:
        table = pa.Table.from_pylist(rows(args.steps, args.short, args.long, tok))
        r = train(cfg, model_path=model, table=table, out_dir=out, seed=0)
        hist = pa.parquet.read_table(Path(r["model_path"]) / "history.parquet").to_pylist()
    times = [h["step_seconds"] for h in hist[1:]]
    return {
        "variant": variant,
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
        "first_step_seconds": hist[0]["step_seconds"],
        "tokens_per_step": hist[-1]["tokens"],
        "peak_mem_gb": r["peak_mem_gb"],
        "trainable_params": r["peft"]["trainable_params"] if r["peft"] else count_parameters(model),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None, help="run one variant in this process (what the parent runs)")
    ap.add_argument("--short", type=int, default=512, help="short prompt tokens (about)")
    ap.add_argument("--long", type=int, default=2048, help="long prompt tokens (about)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (the first is not timed)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r), all linear layers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--order", default="full,lora,lora,full")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--render", default=None, help="rewrite results_lora.md from this results JSON (no measuring)")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        write(saved["results"], saved["meta"], Path(args.out))
        return

    results = []
    for variant in args.order.split(","):
        before = loadavg()
        cmd = [sys.executable, __file__, "--child", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("short", "long", "steps", "r", "threads")
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        }
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
        res.update(loadavg_before=before, loadavg_after=loadavg())
        results.append(res)
        print(
            f"{variant}: step {res['step_seconds_median']:.2f} s, peak {res['peak_mem_gb']:.2f} GB, "
            f"load {before[0]:.1f}->{res['loadavg_after'][0]:.1f}",
            flush=True,
        )

    meta = {
        "model": "SmolLM2-135M-Instruct (embedded), fp32, CPU, plain torch",
        "algo": "SoLo-DPO (solo: short pair + long chosen forward), micro 1, no gradient checkpointing",
        "short_tokens": args.short,
        "long_tokens": args.long,
        "steps": args.steps,
        "lora": f"r={args.r} alpha={2 * args.r} all-linear",
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    write(results, meta, Path(args.out))


def ratios(results: list[dict]) -> dict[str, float | list[float]]:
    """LoRA / full: of the medians per variant, of the fastest step per variant (the least disturbed by other
    jobs), and per adjacent (full, lora) pair of runs in the order run."""

    def med(v: str, k: str) -> float:
        return statistics.median(r[k] for r in results if r["variant"] == v)

    def fastest(v: str) -> float:
        return min(t for r in results if r["variant"] == v for t in r["step_seconds"])

    pairs = [
        (b if b["variant"] == "lora" else a)["step_seconds_median"]
        / (a if a["variant"] == "full" else b)["step_seconds_median"]
        for a, b in zip(results[::2], results[1::2], strict=False)
        if {a["variant"], b["variant"]} == {"full", "lora"}
    ]
    return {
        "step_time_medians": med("lora", "step_seconds_median") / med("full", "step_seconds_median"),
        "step_time_fastest": fastest("lora") / fastest("full"),
        "step_time_pairs": pairs,
        "peak_mem": med("lora", "peak_mem_gb") / med("full", "peak_mem_gb"),
    }


def write(results: list[dict], meta: dict, out_dir: Path) -> None:
    r = ratios(results)
    (out_dir / "results_lora.json").write_text(
        json.dumps({"meta": meta, "results": results, "ratio_lora_over_full": r}, indent=2) + "\n"
    )
    lines = [
        "# Full fine-tuning vs LoRA: step time and peak memory (bench/train/bench_lora.py)",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| run | variant | trainable params | steps (s) | median step (s) | first step (s) | peak RSS (GB) "
        "| load avg before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(results, 1):
        lines.append(
            f"| {i} | {x['variant']} | {x['trainable_params']:,} | {', '.join(f'{t:.1f}' for t in x['step_seconds'])} "
            f"| {x['step_seconds_median']:.2f} | {x['first_step_seconds']:.2f} | {x['peak_mem_gb']:.2f} | "
            f"{x['loadavg_before'][0]:.1f} -> {x['loadavg_after'][0]:.1f} |"
        )
    lines += [
        "",
        f"LoRA / full in this run: peak memory **{r['peak_mem']:.2f}** (medians); step time {r['step_time_medians']:.2f}"
        f" (medians), {r['step_time_fastest']:.2f} (fastest step of each), per adjacent pair "
        f"{', '.join(f'{p:.2f}' for p in r['step_time_pairs'])}.",
        "",
        "Peak RSS is the process maximum (weights, gradients, AdamW state, activations); step times on a CPU shared "
        "with other jobs move with the load average beside them: when the pair ratios disagree, the step-time ratio "
        "was not resolved by this run.",
        "",
    ]
    (out_dir / "results_lora.md").write_text("\n".join(lines))
    print(
        f"LoRA/full: peak memory {r['peak_mem']:.3f}; step time {r['step_time_medians']:.3f} (medians), "
        f"{r['step_time_fastest']:.3f} (fastest), pairs {[round(p, 3) for p in r['step_time_pairs']]}"
    )


if __name__ == "__main__":
    main()
