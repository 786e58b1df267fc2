"""The eval report: statistics per cell and per comparison, report.md, the plots, the model-card table.

Pure functions of the scored rows (the `eval` stage's table) and of the report dict they build: `summarize` ->
report.json, `report_markdown` -> report.md, `plot_accuracy` / `plot_depth` -> PNGs, `add_to_model_cards` -> the
eval table in each model trained in the run. Every rate is in percent (0-100); intervals come from solopo.stats.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from solopo import stats
from solopo.pipeline.config import format_length

log = logging.getLogger("solopo")

NA_CONTEXT = "n/a (exceeds context)"
BASELINE_MODES = ("long", "expand-long", "short")  # what SoLo is compared against when present
REPORT_SCHEMA = 3
# Two models whose answers are cut at max_tokens this many points apart are not compared on their answers alone.
TRUNCATION_GAP_POINTS = 10.0
SIGNIFICANCE_RULE = (
    "significant only when both the 95% paired bootstrap interval excludes 0 and the exact two-sided McNemar test "
    "gives p < 0.05 (the percentile bootstrap alone calls 10-11% of pairs of equally good models different at "
    "n = 8, the rule 0.1-0.2%; at n = 20-100 the rule 2-4%: bench/stats/results.md)"
)


def _pct(x: float) -> float:
    return round(100 * x, 4)  # enough digits that the 1-decimal report does not round twice


def cell_sizes(rows: list[dict[str, Any]]) -> dict[tuple, int]:
    sizes: dict[tuple, int] = defaultdict(int)
    for r in rows:
        sizes[(r["model"], r["dataset"], r["target_len"])] += 1
    return sizes


def _cell(model: str, dataset: str, target_len: int, scores: list[bool], **extra: Any) -> dict[str, Any]:
    n, k = len(scores), sum(scores)
    lo, hi = stats.wilson_interval(k, n)
    return {
        "model": model,
        "dataset": dataset,
        "target_len": target_len,
        **extra,
        "status": "measured",
        "n": n,
        "correct": k,
        "sub_em_pct": _pct(k / n),
        "ci95_low_pct": _pct(lo),
        "ci95_high_pct": _pct(hi),
        "ci95_half_width_pct": _pct((hi - lo) / 2),
    }


def _na_cell(skip: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": skip["model"],
        "dataset": skip["dataset"],
        "target_len": skip["target_len"],
        **extra,
        "status": NA_CONTEXT,
        "n": 0,
        "correct": None,
        "sub_em_pct": None,
        "ci95_low_pct": None,
        "ci95_high_pct": None,
        "ci95_half_width_pct": None,
        "skipped": {
            k: skip[k] for k in ("prompts", "prompts_over", "max_prompt_tokens", "max_tokens", "model_context")
        },
    }


def comparison_pairs(models: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(model, reference) pairs: every non-base model vs the base; each SoLo model vs each baseline mode."""
    pairs: list[tuple[str, str]] = []
    base = next((m for m in models if m["role"] == "base"), None)
    if base is not None:
        pairs += [(m["label"], base["label"]) for m in models if m["role"] != "base"]
    solos = [m for m in models if m.get("mode") == "solo"]
    baselines = [m for m in models if m.get("mode") in BASELINE_MODES]
    pairs += [(s["label"], b["label"]) for s in solos for b in baselines]
    return pairs


def compare(
    rows: list[dict[str, Any]],
    model: str,
    reference: str,
    resamples: int = stats.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Paired comparison of two models on the questions both answered: one entry per (dataset, length),
    plus one per dataset over all lengths when there are several. Pairs match on (dataset, id, length,
    depth); the bootstrap resamples question ids, so answers to one question at several lengths/depths
    move together."""
    score: dict[str, dict[tuple, bool]] = {model: {}, reference: {}}
    for r in rows:
        if r["model"] in score:
            score[r["model"]][(r["dataset"], r["id"], r["target_len"], r["depth"])] = bool(r["sub_em"])
    common = sorted(set(score[model]) & set(score[reference]))
    groups: dict[tuple[str, int | None], list[tuple]] = defaultdict(list)
    for key in common:
        groups[(key[0], key[2])].append(key)
    by_ds: dict[str, list[int]] = defaultdict(list)
    for ds, tl in groups:
        by_ds[ds].append(tl)
    for ds, tls in by_ds.items():
        if len(tls) > 1:
            groups[(ds, None)] = [k for k in common if k[0] == ds]
    out = []
    for (ds, tl), keys in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0)):
        a = [score[model][k] for k in keys]
        b = [score[reference][k] for k in keys]
        boot = stats.paired_bootstrap(a, b, clusters=[k[1] for k in keys], resamples=resamples, seed=seed)
        only_model = sum(x and not y for x, y in zip(a, b, strict=True))
        only_ref = sum(y and not x for x, y in zip(a, b, strict=True))
        p_value = stats.mcnemar_exact(only_model, only_ref)
        out.append(
            {
                "model": model,
                "reference": reference,
                "dataset": ds,
                "target_len": tl,  # None: all lengths of the dataset
                "n_pairs": boot.n_pairs,
                "n_questions": boot.n_clusters,
                "model_pct": _pct(sum(a) / len(a)),
                "reference_pct": _pct(sum(b) / len(b)),
                "diff_pct_points": _pct(boot.diff),
                "ci95_low_pct_points": _pct(boot.low),
                "ci95_high_pct_points": _pct(boot.high),
                "significant": stats.significant(boot, p_value),
                "bootstrap_excludes_0": boot.significant,
                "model_only_correct": only_model,
                "reference_only_correct": only_ref,
                "mcnemar_p": p_value,
                # The exact test assumes independent pairs; one question at several lengths/depths is not.
                "pairs_independent": boot.n_pairs == boot.n_clusters,
            }
        )
    return out


def detectable(cell_ns: list[int]) -> dict[str, Any]:
    """The smallest true model difference each cell size detects with 80% power, and questions for 10/5/2 points."""
    return {
        "rule": f"a true difference detected {stats.POWER:.0%} of the time by a two-sided test at 95% confidence, for "
        "two independent models at 50% accuracy (the widest case; paired t-test approximation); models that agree "
        "on most questions are told apart with fewer",
        "power": stats.POWER,
        "by_n": [{"n": n, "difference_pct_points": _pct(stats.detectable_difference(n))} for n in sorted(set(cell_ns))],
        "questions_needed": {str(d): stats.questions_needed(d / 100) for d in (10, 5, 2)},
    }


def truncation_flags(accuracy: list[dict[str, Any]], gap: float = TRUNCATION_GAP_POINTS) -> tuple[dict, list[str]]:
    """({model: % of answers cut at max_tokens over its measured cells}, warnings for pairs of models `gap` or
    more points apart: their accuracy difference may come from the budget or decoding, not from the answers)."""
    cut: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for a in accuracy:
        if a["status"] == "measured":
            cut[a["model"]][0] += a["truncated_pct"] * a["n"] / 100
            cut[a["model"]][1] += a["n"]
    rates = {m: _pct(k / n) for m, (k, n) in cut.items() if n}
    flags = []
    names = list(rates)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if abs(rates[a] - rates[b]) >= gap:
                flags.append(
                    f"answers cut at max_tokens differ by {abs(rates[a] - rates[b]):.1f} points between {a} "
                    f"({rates[a]:.1f}%) and {b} ({rates[b]:.1f}%): their accuracy difference may come from the "
                    "generation budget or decoding, not from the answers. Check with a larger max_tokens and "
                    "eval.dtype=float32 (bf16 greedy decoding flips near-tied tokens)."
                )
    return rates, flags


def summarize(
    rows: list[dict[str, Any]],
    models: list[dict[str, Any]] | None = None,
    skipped: list[dict[str, Any]] | tuple = (),
    settings: dict[str, Any] | None = None,
    resamples: int = stats.BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The report: accuracy per (model, dataset, length) and per depth with Wilson intervals, NA_CONTEXT
    cells, paired comparisons, detectable differences. Every rate is in percent (0-100)."""
    by_len: dict[tuple, list[bool]] = defaultdict(list)
    by_depth: dict[tuple, list[bool]] = defaultdict(list)
    tokens: dict[tuple, list[int]] = defaultdict(list)
    truncated: dict[tuple, list[bool]] = defaultdict(list)
    for r in rows:
        key = (r["model"], r["dataset"], r["target_len"])
        by_len[key].append(bool(r["sub_em"]))
        tokens[key].append(r["long_tokens"])
        truncated[key].append(r.get("finish_reason") == "length")
        if r["depth"] >= 0:
            by_depth[(*key, r["depth"])].append(bool(r["sub_em"]))
    if models is None:
        paths = {r["model"]: r.get("model_path") for r in rows}
        models = [{"label": m, "path": p, "role": "model", "algo": None, "mode": None} for m, p in paths.items()]
    labels = [m["label"] for m in models]
    accuracy = [
        _cell(
            m,
            d,
            n,
            v,
            mean_context_tokens=round(sum(tokens[(m, d, n)]) / len(v), 1),
            truncated_pct=_pct(sum(truncated[(m, d, n)]) / len(v)),
        )
        for (m, d, n), v in by_len.items()
    ]
    accuracy += [_na_cell(s) for s in skipped]
    depths = sorted({k[3] for k in by_depth} | set((settings or {}).get("depths") or []))
    depth = [_cell(m, d, n, v, depth=p) for (m, d, n, p), v in by_depth.items()]
    depth += [_na_cell(s, depth=p) for s in skipped for p in depths]
    comparisons = []
    for a, b in comparison_pairs(models):
        comparisons += compare(rows, a, b, resamples=resamples, seed=seed)
    truncated_by_model, flags = truncation_flags(accuracy)
    order = {m: i for i, m in enumerate(labels)}
    accuracy.sort(key=lambda c: (order.get(c["model"], len(order)), c["dataset"], c["target_len"]))
    depth.sort(key=lambda c: (order.get(c["model"], len(order)), c["dataset"], c["target_len"], c["depth"]))
    return {
        "schema_version": REPORT_SCHEMA,
        "unit": "percent",
        "units": {
            "*_pct": "percent of questions (0-100)",
            "*_pct_points": "difference of two percentages, in percentage points",
            "*_tokens": "tokens of the first model's tokenizer",
        },
        "models": labels,
        "model_paths": {m["label"]: m["path"] for m in models},
        "model_info": models,
        "datasets": sorted({r["dataset"] for r in rows} | {s["dataset"] for s in skipped}),
        "lengths": sorted({r["target_len"] for r in rows} | {s["target_len"] for s in skipped}),
        "settings": settings or {},
        "significance_rule": SIGNIFICANCE_RULE,
        "flags": flags,
        "truncated_pct_by_model": truncated_by_model,
        "question_ids": {
            d: sorted({str(r["id"]) for r in rows if r["dataset"] == d}) for d in sorted({r["dataset"] for r in rows})
        },
        "accuracy": accuracy,
        "depth": depth,
        "comparisons": comparisons,
        "detectable": detectable([c["n"] for c in accuracy if c["status"] == "measured"]),
    }


def format_cell(cell: dict[str, Any] | None) -> str:
    """'25.0 [7.1, 59.1] (n=8)', NA_CONTEXT, or '-' (not evaluated)."""
    if cell is None:
        return "-"
    if cell["status"] != "measured":
        return cell["status"]
    return f"{cell['sub_em_pct']:.1f} [{cell['ci95_low_pct']:.1f}, {cell['ci95_high_pct']:.1f}] (n={cell['n']})"


def _fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def report_markdown(report: dict[str, Any]) -> str:
    s = report.get("settings", {})
    acc = {(a["model"], a["dataset"], a["target_len"]): a for a in report["accuracy"]}
    lines = ["# Long-context QA (sub-EM, %)", ""]
    rule = s.get("match", "?")
    lines.append(
        f"Sub-EM ({rule} rule) in percent with a 95% Wilson interval and n = questions scored per cell. "
        f"{NA_CONTEXT}: the prompt plus max_tokens does not fit the model's context, so nothing was measured."
    )
    lines.append("")
    run = report.get("run")
    if run:
        lines += [
            f"Run `{run['run_id']}`, {run['created']}, config sha256 `{run['config_sha256'][:12]}`, seed {run['seed']}.",
            "",
        ]
    for flag in report.get("flags", []):
        lines += [f"> **Check:** {flag}", ""]
    cols = [(d, n) for d in report["datasets"] for n in report["lengths"]]
    lines.append("| model | " + " | ".join(f"{d} {format_length(n)}" for d, n in cols) + " | mean of cells |")
    lines.append("|---|" + "---:|" * (len(cols) + 1))
    for m in report["models"]:
        vals = [acc.get((m, d, n)) for d, n in cols]
        got = [v["sub_em_pct"] for v in vals if v and v["status"] == "measured"]
        mean = f"{sum(got) / len(got):.1f}" if got else "-"
        if got and len(got) < sum(v is not None for v in vals):
            mean += f" ({len(got)} of {sum(v is not None for v in vals)} cells)"
        lines.append(f"| {m} | " + " | ".join(format_cell(v) for v in vals) + f" | {mean} |")
    lines += ["", "![accuracy vs length](accuracy_vs_length.png)", ""]

    comps = report.get("comparisons", [])
    if comps:
        boot = s.get("bootstrap", {})
        lines += [
            "## Paired comparisons",
            "",
            "Same questions for both models (matched on dataset, id, length, depth). diff = model - reference in "
            f"percentage points with a 95% paired bootstrap interval ({boot.get('resamples', '?'):,} resamples of "
            f"the questions, seed {boot.get('seed', '?')}); McNemar = exact two-sided p on the discordant pairs "
            f"(only-model-right vs only-reference-right). **{report.get('significance_rule', SIGNIFICANCE_RULE)}**.",
            "",
            "| model | reference | dataset | length | pairs | diff (pp) | 95% interval | only model / only ref | "
            "McNemar p | |",
            "|---|---|---|---:|---:|---:|---|---:|---:|---|",
        ]
        dagger = False
        for c in comps:
            length = "all" if c["target_len"] is None else format_length(c["target_len"])
            p = _fmt_p(c["mcnemar_p"])
            if not c["pairs_independent"]:
                p += " †"
                dagger = True
            lines.append(
                f"| {c['model']} | {c['reference']} | {c['dataset']} | {length} | {c['n_pairs']} | "
                f"{c['diff_pct_points']:+.1f} | [{c['ci95_low_pct_points']:+.1f}, {c['ci95_high_pct_points']:+.1f}] | "
                f"{c['model_only_correct']} / {c['reference_only_correct']} | {p} | "
                f"{'**significant**' if c['significant'] else 'not significant'} |"
            )
        if dagger:
            lines += [
                "",
                "† one question appears at several lengths or depths here: the exact test treats those answers as "
                "independent (too optimistic); the bootstrap interval, which resamples whole questions, must also "
                "exclude 0.",
            ]
        lines.append("")
    elif len(report["models"]) > 1:
        lines += ["No paired comparison: no base model and no SoLo/baseline pair among the models.", ""]

    det = report.get("detectable")
    if det and det["by_n"]:
        sizes = ", ".join(
            f"n={b['n']}: " + ("none" if b["difference_pct_points"] >= 100 else f"{b['difference_pct_points']:.1f}")
            for b in det["by_n"]
        )
        need = det["questions_needed"]
        lines += [
            "## How many questions",
            "",
            f"Smallest true difference between two models, in points, that a cell of n questions detects "
            f"{det.get('power', stats.POWER):.0%} of the time: {sizes} ({det['rule']}). To detect 10 points ask for "
            f"`--n-questions {need['10']}` per dataset, 5 points {need['5']}, 2 points {need['2']}.",
            "",
        ]

    if report["depth"]:
        lines += [
            "## By gold-evidence depth",
            "",
            "| model | dataset | length | depth | sub-EM % [95% interval] (n) |",
            "|---|---|---:|---:|---:|",
        ]
        for a in report["depth"]:
            lines.append(
                f"| {a['model']} | {a['dataset']} | {format_length(a['target_len'])} | {a['depth']:.2f} | "
                f"{format_cell(a)} |"
            )
        lines += ["", "![accuracy vs depth](accuracy_vs_depth.png)", ""]

    if s:
        info = {m["label"]: m for m in report.get("model_info", [])}
        lines += ["## Settings", ""]
        for label, path in report["model_paths"].items():
            m = info.get(label, {})
            extra = ", ".join(f"{k} {m[k]}" for k in ("backend", "dtype") if m.get(k))
            train = m.get("training") or {}
            if train:
                extra += "; trained: " + ", ".join(f"{k} {v}" for k, v in train.items() if v is not None)
            lines.append(f"- `{label}`: `{path}`" + (f" ({extra})" if extra else ""))
        rates = report.get("truncated_pct_by_model") or truncation_flags(report["accuracy"])[0]
        cut_text = ", ".join(f"{m} {t:.1f}%" for m, t in rates.items())
        if s.get("dtype_requested"):
            lines.append(f"- inference dtype: {s['dtype_requested']} ({s.get('dtype_requested_from')})")
        lines += [
            f"- generation: {s.get('decoding')}, max_tokens {s.get('max_tokens')} (from {s.get('max_tokens_from')}); "
            f"answers cut at max_tokens: {cut_text}",
            f"- metric: {s.get('metric')}",
            f"- questions: {s.get('n_questions_requested')} requested per dataset, "
            f"{', '.join(str(n) for n in s.get('n_per_cell', []))} scored per cell; seed {s.get('seed')}",
            f"- contexts: the run's synth settings (short_docs {s.get('synth', {}).get('short_docs')}, tolerance "
            f"{s.get('synth', {}).get('tolerance')}); all settings and library versions are in report.json",
            "",
        ]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs: list[float], cells: list[dict[str, Any]], label: str) -> None:
    ys = [c["sub_em_pct"] for c in cells]
    err = [[y - c["ci95_low_pct"] for y, c in zip(ys, cells, strict=True)],
           [c["ci95_high_pct"] - y for y, c in zip(ys, cells, strict=True)]]  # fmt: skip
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Accuracy vs length per dataset with 95% Wilson error bars (models nudged apart so bars do not overlap)."""
    plt = _plt()
    datasets = report["datasets"]
    models = report["models"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for i, m in enumerate(models):
            cells = sorted(
                (a for a in report["accuracy"] if a["model"] == m and a["dataset"] == d and a["status"] == "measured"),
                key=lambda a: a["target_len"],
            )
            if cells:
                nudge = 2 ** (0.04 * (i - (len(models) - 1) / 2))  # log2 x axis: a multiplicative offset
                _errorbar(ax, [a["target_len"] * nudge for a in cells], cells, m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["lengths"], [format_length(n) for n in report["lengths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("sub-EM (%), 95% interval")
        ax.set_ylim(0, 100)  # a fixed scale: small samples must not look like large effects
        ax.set_title(d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depth(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    groups: dict[tuple, list] = defaultdict(list)
    for a in report["depth"]:
        if a["status"] == "measured":
            groups[(a["model"], a["dataset"], a["target_len"])].append(a)
    for i, ((m, d, n), cells) in enumerate(sorted(groups.items())):
        cells.sort(key=lambda a: a["depth"])
        nudge = 0.006 * (i - (len(groups) - 1) / 2)
        _errorbar(ax, [a["depth"] + nudge for a in cells], cells, f"{m} / {d} / {format_length(n)}")
    ax.set_xlabel("gold evidence depth (fraction of context)")
    ax.set_ylabel("sub-EM (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_to_model_cards(report: dict[str, Any], note: Callable[[str], None], run_dir: Path) -> None:
    """Put each model trained in this run's eval tables into its model card: accuracy per cell (sub-EM %) and,
    separately, its paired comparisons (points vs another model). report.json names a model trained in the run
    by its path relative to `run_dir`. Models passed with --model are inputs, not outputs: their dirs are
    fingerprinted, so they are left unchanged. Only cards inside this run dir are written (the lock covers it;
    another run dir is another command's)."""
    from solopo.pipeline.io import path_in_run
    from solopo.training.model_card import add_eval_results

    s = report["settings"]
    for m in report["model_info"]:
        if not m.get("trained_here"):
            continue
        path = Path(run_dir) / m["path"]  # an absolute path stays itself
        if Path(path_in_run(path, run_dir)).is_absolute():
            note(f"{m['label']}: {path} is outside this run dir {run_dir}; its model card is left unchanged")
            continue
        if not (path / "README.md").exists():
            note(f"{m['label']}: no model card at {m['path']}/README.md in the run dir; eval results not added")
            continue
        rows = [
            {
                "dataset": a["dataset"],
                "length": format_length(a["target_len"]),
                "sub-EM % [95% interval] (n)": format_cell(a),
            }
            for a in report["accuracy"]
            if a["model"] == m["label"]
        ]
        comparisons = [
            {
                "vs": c["reference"],
                "dataset": c["dataset"],
                "length": "all" if c["target_len"] is None else format_length(c["target_len"]),
                "difference (points)": f"{c['diff_pct_points']:+.1f}",
                "95% interval (points)": f"[{c['ci95_low_pct_points']:+.1f}, {c['ci95_high_pct_points']:+.1f}]",
                "McNemar p": _fmt_p(c["mcnemar_p"]),
                "significant": "yes" if c["significant"] else "no",
            }
            for c in report["comparisons"]
            if c["model"] == m["label"]
        ]
        notes = (
            f"Long-context QA by `solopo eval`: sub-EM ({s.get('match')} rule) in percent with a 95% Wilson "
            f"interval and n questions per cell; greedy, max_tokens {s.get('max_tokens')}. Paired comparisons: "
            "this model minus another on the same questions, in percentage points, with a 95% paired bootstrap "
            f"interval; {report.get('significance_rule', SIGNIFICANCE_RULE)}. Full report: the training run's "
            "`eval/report.md`."
        )
        add_eval_results(path, rows, title="Evaluation", notes=notes, tables=[("Paired comparisons", comparisons)])
        log.info("[eval] added the eval tables to %s", path / "README.md")
