"""Sampling throughput: vLLM vs transformers on the same short prompts, in one run, on one machine.

    # both backends (vLLM needs its own environment: bash scripts/setup_vllm_cpu.sh)
    source scripts/setup_vllm_cpu.sh --env-only
    .venv-vllm/bin/python bench/sample/bench_sample.py
    # transformers only (main environment): the vLLM rows say why they are missing
    python3 bench/sample/bench_sample.py

Prompts are real MuSiQue questions with their supporting paragraphs (x_short, the stage's input), rendered
with the model's chat template by each backend. Measured: generated tokens per second and questions per
second of `backend.generate` (engine start-up reported apart), plus the sub-EM pass rate as a sanity check.
Writes results.json, results.md and throughput.png next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from solopo.metrics import extract_final_answer, sub_em  # noqa: E402
from solopo.prompts import render_document, render_prompt  # noqa: E402

DATA = HERE.parents[1] / "solopo" / "data" / "musique_ans_train_sample.jsonl"


def short_prompts(k: int) -> tuple[list[str], list[list[str]]]:
    prompts, golds = [], []
    with open(DATA) as f:
        for line in f:
            r = json.loads(line)
            docs = [p for p in r["paragraphs"] if p["is_supporting"]]
            rendered = [render_document(i + 1, p["title"], p["paragraph_text"]) for i, p in enumerate(docs)]
            prompts.append(render_prompt(rendered, r["question"]))
            golds.append([r["answer"], *r.get("answer_aliases", [])])
            if len(prompts) == k:
                break
    return prompts, golds


def run_one(name: str, model: str, prompts, golds, args, **opts) -> dict:
    from solopo.backends import get_backend

    t0 = time.perf_counter()
    backend = get_backend(name, model, **opts)
    init = time.perf_counter() - t0
    # Warm-up on one prompt (first-call allocations and kernel selection are not throughput).
    backend.generate(prompts[:1], n=1, temperature=args.temperature, top_p=1.0, max_tokens=8, seed=0)
    t0 = time.perf_counter()
    outs = backend.generate(
        prompts, n=args.n, temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens,
        seed=list(range(len(prompts))),
    )
    wall = time.perf_counter() - t0
    backend.close()
    tokens = sum(g.num_tokens for gens in outs for g in gens)
    correct = sum(sub_em(extract_final_answer(g.text), gold) for gens, gold in zip(outs, golds, strict=True) for g in gens)
    truncated = sum(g.finish_reason == "length" for gens in outs for g in gens)
    total = sum(len(gens) for gens in outs)
    return {
        "backend": name,
        "dtype": opts.get("dtype", "auto"),
        "init_seconds": round(init, 1),
        "generate_seconds": round(wall, 1),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 1),
        "questions_per_second": round(len(prompts) / wall, 4),
        "samples": total,
        "sub_em_pass_rate": round(correct / total, 3),
        "truncated_fraction": round(truncated / total, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (cpu-demo preset: 8; paper: 32)")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--temperature", type=float, default=0.85)
    ap.add_argument("--batch-size", type=int, default=64, help="transformers: sequences per generate call")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()

    import torch
    import transformers

    from solopo.backends import vllm_available
    from solopo.models import resolve_model

    model = resolve_model(args.model)
    prompts, golds = short_prompts(args.questions)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs, skipped = [], []
    # Same numerics first (fp32 on both), then vLLM in bf16 (what its CPU build is tuned for).
    plan = [
        ("transformers", {"dtype": "float32", "batch_size": args.batch_size}),
        # What dtype=auto picks on GPUs and on CPUs with bf16 matrix units (AMX / AVX512-BF16).
        ("transformers", {"dtype": "bfloat16", "batch_size": args.batch_size}),
    ]
    if vllm_available():
        vopts = {"enforce_eager": True, "max_model_len": 4096} if device == "cpu" else {}
        plan += [("vllm", {"dtype": "float32", **vopts}), ("vllm", {"dtype": "bfloat16", **vopts})]
    else:
        skipped.append("vllm: not importable in this environment (CPU: bash scripts/setup_vllm_cpu.sh)")
    load_before = os.getloadavg()
    for name, opts in plan:
        print(f"running {name} {opts} ...", flush=True)
        try:
            runs.append(run_one(name, model, prompts, golds, args, **opts))
            print(json.dumps(runs[-1]), flush=True)
        except Exception as e:  # a backend that fails here is reported, not hidden
            skipped.append(f"{name} {opts.get('dtype')}: {type(e).__name__}: {e}")
    base = next((r for r in runs if r["backend"] == "transformers"), None)  # transformers fp32 is the baseline
    for r in runs:
        r["speedup_vs_transformers"] = round(r["tokens_per_second"] / base["tokens_per_second"], 2) if base else None

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import vllm

        versions["vllm"] = vllm.__version__
    except ImportError:
        pass
    result = {
        "what": "sampling throughput of the sample stage's backends on the same prompts, one run",
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "device": device,
        "cpu_count": os.cpu_count(),
        # Other processes on the machine slow every backend; the load average says how busy it was.
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "platform": platform.platform(),
        "versions": versions,
        "settings": {"questions": args.questions, "n": args.n, "max_tokens": args.max_tokens,
                     "temperature": args.temperature, "top_p": 1.0, "transformers_batch_size": args.batch_size},
        "runs": runs,
        "skipped": skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    plot(result, args.out / "throughput.png")
    print(markdown(result))


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "# Sampling throughput: vLLM vs transformers",
        "",
        f"Model {res['model']} on {res['device']} ({res['cpu_count']} cores, 1-min load average "
        f"{res['load_average_1m']['before']} before / {res['load_average_1m']['after']} after), {res['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".",
        f"{s['questions']} MuSiQue short prompts (supporting paragraphs), n={s['n']} samples each, "
        f"T={s['temperature']}, top_p={s['top_p']}, max_tokens={s['max_tokens']}. All rows measured in one run.",
        "",
        "| backend | dtype | generated tok/s | questions/s | speed-up vs transformers | generated tokens | "
        "generate s | engine start s | sub-EM pass rate | truncated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['backend']} | {r['dtype']} | {r['tokens_per_second']} | {r['questions_per_second']} | "
            f"{r['speedup_vs_transformers']}x | {r['generated_tokens']} | {r['generate_seconds']} | "
            f"{r['init_seconds']} | {r['sub_em_pass_rate']} | {r['truncated_fraction']} |"
        )
    if res["skipped"]:
        lines += ["", "Not measured:"] + [f"- {x}" for x in res["skipped"]]
    lines += ["", "![throughput](throughput.png)", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not res["runs"]:
        return
    labels = [f"{r['backend']}\n{r['dtype']}" for r in res["runs"]]
    vals = [r["tokens_per_second"] for r in res["runs"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(labels, vals, color=["#888" if r["backend"] == "transformers" else "#3b7" for r in res["runs"]])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{res['model']} on {res['device']}, n={res['settings']['n']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
