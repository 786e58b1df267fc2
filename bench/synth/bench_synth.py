"""Benchmark: solopo's synth context builder vs RULER's real QA builder (bench/synth/ruler_qa.py), 4K-32K.

    python3 bench/synth/bench_synth.py                   # the first 60 shipped MuSiQue questions, 4K-32K
    python3 bench/synth/bench_synth.py --questions 299   # every shipped question (train + dev samples)
    python3 bench/synth/bench_synth.py --quick           # a smoke run: 20 questions, 4K and 8K

One run, one machine, the same questions, tokenizer (the embedded SmolLM2-135M-Instruct's) and chat-rendered
prompt counting for both. It measures, in this order:

  1. end-to-end: `solopo synth --target-len 4k,8k,16k,32k` as one process vs RULER as it is run, one
     `ruler_qa.py` process per length; wall time including process start, imports, tokenizer and data loading.
  2. builder-only, in this process: ContextBuilder.build (pool tokenization and its 64-prompt verification
     included) vs RulerQA.generate_samples per length.
  3. quality of the builder-only outputs (the end-to-end outputs are checked to be the same prompts): every
     prompt re-tokenized in full; % inside the 2% window [ceil(0.98 T), T]; mean/min tokens as % of T;
     prompts with an answer string (whole words, as solopo's filter tests it) in a non-gold document;
     where the gold documents sit (depth = position / (n_docs - 1)).

The load average is recorded before and after each timed part (the machine is shared).
Writes results.json, results.md and synth.png next to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ruler_qa import RulerInfiniteLoop, chat_counter, from_musique, read_musique, ruler_template  # noqa: E402

from solopo.datasets import contains_answer, load_records, match_key  # noqa: E402
from solopo.datasets.base import DATA_DIR  # noqa: E402
from solopo.prompts import PROMPT_TEMPLATE  # noqa: E402
from solopo.stages.contexts import ContextBuilder, SynthConfig, TokenCounter  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = [4096, 8192, 16384, 32768]
SHIPPED = ["musique_ans_train_sample.jsonl", "musique_ans_dev_sample.jsonl"]
# solopo's documents: "Document {i} (Title: {title}): {text}" joined by a blank line.
_SOLOPO_DOC = re.compile(r"\n\n(?=Document \d+ \(Title: )")
_SOLOPO_PARTS = re.compile(r"Document \d+ \(Title: (.*?)\): (.*)", re.DOTALL)
_PREFIX, _SUFFIX = PROMPT_TEMPLATE.split("{documents}")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed_process(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return secs


# --- 1. end-to-end -------------------------------------------------------------------------------------
def end_to_end(data: Path, targets: list[int], work: Path, tokenizer_dir: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out: dict[str, Any] = {"load_before": loadavg()}
    spec = ",".join(str(t) for t in targets)
    run_dir = work / "solopo-run"
    cmd = [
        sys.executable,
        "-m",
        "solopo.cli",
        "synth",
        "--data",
        str(data),
        "--target-len",
        spec,
        "--run-dir",
        str(run_dir),
        "--log-level",
        "warning",
    ]
    out["solopo_seconds"] = round(timed_process(cmd, env), 2)
    out["solopo_command"] = "solopo synth --data <shipped> --target-len " + spec
    out["load_between"] = loadavg()
    per = {}
    for t in targets:
        cmd = [
            sys.executable,
            str(HERE / "ruler_qa.py"),
            "--data",
            str(data),
            "--max-seq-length",
            str(t),
            "--tokenizer",
            tokenizer_dir,
            "--template",
            ruler_template(PROMPT_TEMPLATE),
            "--out",
            str(work / f"ruler-{t}.jsonl"),
        ]
        per[t] = round(timed_process(cmd, env), 2)
    out["ruler_seconds_per_length"] = per
    out["ruler_seconds"] = round(sum(per.values()), 2)
    out["load_after"] = loadavg()
    out["ratio"] = round(out["ruler_seconds"] / out["solopo_seconds"], 2)
    return out


# --- 2. builder-only -----------------------------------------------------------------------------------
def solopo_builder(records, tok, cfg: SynthConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    stats: dict[str, Any] = {}

    def stat(k, v, how="set"):
        stats[k] = max(stats.get(k, v), v) if how == "max" else (stats.get(k, 0) + v if how == "sum" else v)

    load0 = loadavg()
    t0 = time.perf_counter()
    builder = ContextBuilder(tok, cfg, seed=0, pool=records, progress=False)
    table = builder.build(records, stat=stat)
    secs = time.perf_counter() - t0
    rows = []
    answers = {r.id: r.answers for r in records}
    for r in table.to_pylist():
        p, tail = r["long_prompt"], _SUFFIX.format(question=r["question"])
        assert p.startswith(_PREFIX) and p.endswith(tail)
        # Title and text of each document, as RULER's documents are ("{title}\n{text}").
        docs = ["\n".join(_SOLOPO_PARTS.fullmatch(d).groups()) for d in _SOLOPO_DOC.split(p[len(_PREFIX) : -len(tail)])]
        if len(docs) != r["n_docs"]:
            raise RuntimeError(f"{r['id']}: parsed {len(docs)} documents, the table says {r['n_docs']}")
        gold = set(r["gold_positions"])
        rows.append(
            {
                "target": r["target_len"],
                "prompt": r["long_prompt"],
                "claimed_tokens": r["long_tokens"],
                "answers": answers[r["id"]],
                "docs": docs,
                "gold": sorted(gold),
            }
        )
    info = {
        "seconds": round(secs, 2),
        "prompts": table.num_rows,
        "load_before": load0,
        "load_after": loadavg(),
        "verify": {k: v for k, v in stats.items() if k.startswith("verify")},
    }
    return info, rows


def ruler_builder(raw: list[dict[str, Any]], tok, targets: list[int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One fresh RulerQA per length: a RULER process per length, seeded the same way each time."""
    info: dict[str, Any] = {
        "seconds_per_length": {},
        "tokenizer_calls": 0,
        "infinite_loops": {},
        "num_docs": {},
        "load_before": loadavg(),
    }
    rows = []
    count = chat_counter(tok)
    template = ruler_template(PROMPT_TEMPLATE)
    for t in targets:
        t0 = time.perf_counter()
        ruler = from_musique(raw, count, template)
        try:
            out = ruler.generate_samples(len(ruler.qas), t)
            info["infinite_loops"][t] = 0
        except RulerInfiniteLoop as e:  # RULER would hang here: record it, keep the questions before it
            info["infinite_loops"][t] = str(e)
            out = []
        info["seconds_per_length"][t] = round(time.perf_counter() - t0, 2)
        info["tokenizer_calls"] += ruler.tokenizer_calls
        info["num_docs"][t] = ruler.num_docs
        for qa, o in zip(ruler.qas, out, strict=False):
            gold = set(qa["context"])
            docs = [ruler.docs[d] for d in o["doc_ids"]]
            rows.append(
                {
                    "target": t,
                    "prompt": o["input"],
                    "claimed_tokens": o["length"],
                    "answers": qa["outputs"],
                    "docs": docs,
                    "gold": [i for i, d in enumerate(o["doc_ids"]) if d in gold],
                }
            )
    info["seconds"] = round(sum(info["seconds_per_length"].values()), 2)
    info["prompts"] = len(rows)
    info["load_after"] = loadavg()
    return info, rows


# --- 3. quality ----------------------------------------------------------------------------------------
def quality(rows: list[dict[str, Any]], counter: TokenCounter, tolerance: float, targets: list[int]) -> dict:
    tokens = counter.count_chat([r["prompt"] for r in rows])
    out: dict[Any, Any] = {}
    for t in targets:
        idx = [i for i, r in enumerate(rows) if r["target"] == t]
        if not idx:
            continue
        v = tokens[idx].astype(float)
        claimed = np.array([rows[i]["claimed_tokens"] for i in idx], dtype=float)
        lo = math.ceil(t * (1 - tolerance))
        leaks, depths, patterns = [], [], set()
        for i in idx:
            r = rows[i]
            keys = [match_key(a) for a in r["answers"]]
            gold = set(r["gold"])
            leaks.append(sum(contains_answer(match_key(d), keys) for j, d in enumerate(r["docs"]) if j not in gold))
            n = len(r["docs"])
            depths += [g / (n - 1) if n > 1 else 0.0 for g in r["gold"]]
            patterns.add((n, tuple(r["gold"])))
        leaks_a = np.asarray(leaks)
        out[t] = {
            "prompts": len(idx),
            "in_window_pct": round(100 * float(np.mean((v >= lo) & (v <= t))), 1),
            "over_target": int((v > t).sum()),
            "mean_tokens_pct": round(100 * float(v.mean()) / t, 2),
            "min_tokens_pct": round(100 * float(v.min()) / t, 2),
            "count_mismatches": int((v != claimed).sum()),  # builder's own count vs the full re-tokenization
            "prompts_with_answer_in_non_gold_doc_pct": round(100 * float(np.mean(leaks_a > 0)), 1),
            "mean_non_gold_docs_with_answer": round(float(leaks_a.mean()), 2),
            "mean_docs": round(float(np.mean([len(rows[i]["docs"]) for i in idx])), 1),
            "gold_depth_hist": np.histogram(depths, bins=10, range=(0.0, 1.0))[0].tolist(),
            "distinct_gold_layouts": len(patterns),
            "depths": [round(d, 4) for d in depths],
            "tokens": v.astype(int).tolist(),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 questions at 4K and 8K (a smoke run)")
    ap.add_argument("--questions", type=int, default=60, help="first N shipped questions: questions and pool of both")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    targets = TARGETS[:2] if args.quick else TARGETS

    from transformers import AutoTokenizer

    from solopo.models import prepare_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    data = work / "musique_shipped.jsonl"
    lines = [ln for f in SHIPPED for ln in (DATA_DIR / f).read_text().splitlines() if ln.strip()]
    data.write_text("\n".join(lines[: 20 if args.quick else args.questions]) + "\n")
    tokenizer_dir = str(prepare_tokenizer())

    res: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "tokenizer": "SmolLM2-135M-Instruct (embedded default), chat template included",
        "targets": targets,
    }
    print(f"[1/3] end-to-end over {targets}", flush=True)
    res["end_to_end"] = end_to_end(data, targets, work, tokenizer_dir)
    print(json.dumps(res["end_to_end"]), flush=True)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = load_records(str(data))
    raw = read_musique(data)
    assert [r["id"] for r in raw] == [r.id for r in records]
    cfg = SynthConfig(target_len=targets, verify_sample=64)
    res["questions"] = len(records)
    res["tolerance"] = cfg.tolerance
    print(f"[2/3] builder-only, {len(records)} questions", flush=True)
    s_info, s_rows = solopo_builder(records, tok, cfg)
    r_info, r_rows = ruler_builder(raw, tok, targets)
    res["builder"] = {"solopo": s_info, "ruler": r_info, "ratio": round(r_info["seconds"] / s_info["seconds"], 2)}
    print(json.dumps(res["builder"]), flush=True)

    # The end-to-end processes built the same prompts (same data, seeds and code paths).
    import pyarrow.parquet as pq

    e2e = pq.read_table(work / "solopo-run" / "synth" / "data.parquet").column("long_prompt").to_pylist()
    same_ruler = all(
        [json.loads(x)["input"] for x in (work / f"ruler-{t}.jsonl").read_text().splitlines()]
        == [r["prompt"] for r in r_rows if r["target"] == t]
        for t in targets
    )
    res["end_to_end_outputs_match_builder_only"] = {
        "solopo": sorted(e2e) == sorted(r["prompt"] for r in s_rows),
        "ruler": same_ruler,
    }

    print("[3/3] quality: re-tokenizing every prompt", flush=True)
    counter = TokenCounter(tok)
    res["quality"] = {
        "solopo": quality(s_rows, counter, cfg.tolerance, targets),
        "ruler": quality(r_rows, counter, cfg.tolerance, targets),
    }
    res["load_end"] = loadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "results.md").write_text(to_markdown(res))
    plot(res, args.out / "synth.png")
    print((args.out / "results.md").read_text())


def to_markdown(res: dict) -> str:
    e, b, q = res["end_to_end"], res["builder"], res["quality"]
    lines = [
        "# synth benchmark: solopo vs RULER's QA builder",
        "",
        f"Machine: {res['machine']['cpu_count']} CPU cores (shared), {res['machine']['platform']}. "
        f"Tokenizer: {res['tokenizer']}. Questions: the first {res['questions']} of the shipped MuSiQue train + dev "
        "samples, for both builders; the distractor pool of both is their paragraphs (RULER costs about a second per "
        "question and length on this shared machine, hence the subset; `--questions 299` runs all). RULER = NVIDIA/RULER "
        "scripts/data/synthetic/qa.py reproduced line by line in `ruler_qa.py` (binary search of the document "
        "count once on question 0, reused, minus 10 documents on overflow, `random.Random(42)` shuffle, the "
        "question's own distractor paragraphs kept). Both count the chat-rendered prompt; RULER's 32 answer tokens "
        "are not reserved (tokens_to_generate=0) so both aim at the same budget. One run, load average recorded.",
        "",
        "## Time",
        "",
        "| measure | solopo s | RULER s | RULER / solopo | load avg (1/5/15 min) |",
        "|---|---:|---:|---:|---|",
        f"| end-to-end, {'/'.join(str(t // 1024) + 'K' for t in res['targets'])}, process start included | "
        f"{e['solopo_seconds']} | {e['ruler_seconds']} | **{e['ratio']}x** | {e['load_before']} -> "
        f"{e['load_between']} -> {e['load_after']} |",
        f"| builder only (in one process) | {b['solopo']['seconds']} | {b['ruler']['seconds']} | "
        f"**{b['ratio']}x** | {b['solopo']['load_before']} -> {b['ruler']['load_after']} |",
        "",
        f"End-to-end = `{e['solopo_command']}` (one process: load stage, synth stage with its verification, "
        "Parquet, manifest, plot) vs one `ruler_qa.py` process per length (RULER's way), "
        f"per length: {e['ruler_seconds_per_length']}. RULER's document counts (from question 0): "
        f"{b['ruler']['num_docs']}; tokenizer calls: {b['ruler']['tokenizer_calls']}; RULER infinite-loop cases "
        f"(raised instead of hanging): {b['ruler']['infinite_loops']}. solopo's own verification: "
        f"{b['solopo']['verify']}. The end-to-end processes produced the same prompts as the builder-only run: "
        f"{res['end_to_end_outputs_match_builder_only']}.",
        "",
        "## Lengths and contents (every prompt re-tokenized in full)",
        "",
        f"Window = [ceil(T x {1 - res['tolerance']:.2f}), T] tokens.",
        "",
        "| target | builder | prompts | in window | over T | mean tokens / T | min tokens / T | count mismatches "
        "| prompts with an answer string in a non-gold doc | mean such docs | mean docs | distinct gold layouts |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in res["targets"]:
        for name in ("solopo", "ruler"):
            v = q[name].get(str(t), q[name].get(t))
            if v is None:
                continue
            lines.append(
                f"| {t} | {name} | {v['prompts']} | {v['in_window_pct']}% | {v['over_target']} | "
                f"{v['mean_tokens_pct']}% | {v['min_tokens_pct']}% | {v['count_mismatches']} | "
                f"{v['prompts_with_answer_in_non_gold_doc_pct']}% | {v['mean_non_gold_docs_with_answer']} | "
                f"{v['mean_docs']} | {v['distinct_gold_layouts']} |"
            )
    lines += [
        "",
        "Gold-document depth (position / (n_docs - 1)), counts in tenths 0-0.1 ... 0.9-1.0:",
        "",
        "| target | builder | histogram |",
        "|---:|---|---|",
    ]
    for t in res["targets"]:
        for name in ("solopo", "ruler"):
            v = q[name].get(str(t), q[name].get(t))
            if v is not None:
                lines.append(f"| {t} | {name} | {v['gold_depth_hist']} |")
    lines += ["", "![synth](synth.png)", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = res["targets"]
    fig, axes = plt.subplots(2, len(targets), figsize=(4 * len(targets), 6.4), squeeze=False)
    colors = {"solopo": "tab:blue", "ruler": "tab:red"}
    for k, t in enumerate(targets):
        lo = math.ceil(t * (1 - res["tolerance"]))
        ax, ad = axes[0][k], axes[1][k]
        for name in ("solopo", "ruler"):
            v = res["quality"][name].get(t) or res["quality"][name].get(str(t))
            if v is None:
                continue
            ax.hist(np.asarray(v["tokens"]) / t, bins=30, alpha=0.6, color=colors[name], label=name)
            ad.hist(v["depths"], bins=20, range=(0, 1), alpha=0.6, color=colors[name], label=name)
        ax.axvspan(lo / t, 1.0, color="tab:orange", alpha=0.2, label="2% window")
        ax.set_title(f"target {t}: prompt tokens / target")
        ad.set_title(f"target {t}: gold-document depth")
        ax.legend(fontsize=7)
        ad.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
