"""Stage `eval`: long-context QA at several lengths, base vs trained (and any other models), one report.

Held-out questions (MuSiQue dev: multi-hop, in domain; HotpotQA dev: out of domain) go through the same
synth machinery as training data, with the run's synth settings (templates, short_docs, tolerance), at each
length (and optionally each gold-evidence depth); every model answers greedily with the CoT prompt and the
run's sampling budget (sample.max_tokens unless eval.max_tokens is set), and sub-EM against answer + aliases
is the score. The report gives each cell a Wilson 95% interval and compares models on the same questions
(paired bootstrap interval, exact McNemar test); report.json stands alone (units, settings, model paths).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import field_validator
from tqdm.auto import tqdm

from solopo import stats
from solopo.engines import EngineConfig
from solopo.pipeline.config import format_length, parse_lengths, register_preset
from solopo.pipeline.errors import ConfigError, SolopoError
from solopo.pipeline.io import dir_fingerprint, write_json, write_text
from solopo.pipeline.stage import Stage

from . import register

log = logging.getLogger("solopo")

# Shipped held-out sources per dataset (the training default is the MuSiQue *train* sample).
DEFAULT_SOURCES = {"musique": "musique-dev-sample", "hotpotqa": "hotpotqa-sample"}
NA_CONTEXT = "n/a (exceeds context)"
BASELINE_MODES = ("long", "expand-long", "short")  # what SoLo is compared against when present
REPORT_SCHEMA = 2


class EvalConfig(EngineConfig):  # + engine: local | ray, ray_address, replicas (solopo.engines)
    lengths: list[int] = [4096, 8192]
    datasets: list[Literal["musique", "hotpotqa"]] = ["musique", "hotpotqa"]
    musique_source: str = DEFAULT_SOURCES["musique"]
    hotpotqa_source: str = DEFAULT_SOURCES["hotpotqa"]
    n_questions: int = 100  # per dataset; the same questions at every length
    depths: list[float] | None = None  # gold-evidence depth sweep, e.g. [0, 0.25, 0.5, 0.75, 1]; None = random
    include_base: bool = True
    models: list[str] = []  # extra models to compare: "label=path" or a path/hub id
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    # None = the run's sample.max_tokens: a smaller budget cuts chains of thought before "The answer is:".
    max_tokens: int | None = None
    batch_size: int = 8
    short_docs: Literal["supporting", "own"] | None = None  # None = the run's synth.short_docs
    match: Literal["word", "substring"] = "word"  # sub-EM rule (solopo.metrics.sub_em); substring = the paper's
    exclude_from: str | None = None  # run dir or triplet Parquet whose ids must not be evaluated on
    bootstrap_resamples: int = stats.BOOTSTRAP_RESAMPLES
    bootstrap_seed: int = 0  # fixed: the report's intervals do not move between reruns

    @field_validator("lengths", mode="before")
    @classmethod
    def _lengths(cls, v: Any) -> list[int]:
        return parse_lengths(v)

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths are fractions of the context, each in [0, 1]")
        return v

    @field_validator("n_questions", "max_tokens", "batch_size", "bootstrap_resamples")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v


# max_tokens follows sample.max_tokens (128 in this preset).
register_preset("cpu-demo", {"eval": {"lengths": [1024, 2048], "n_questions": 8, "batch_size": 8}})


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'label=path' -> (label, path); 'path' -> (basename, path)."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label.strip(), path.strip()
    return Path(spec.rstrip("/")).name or spec, spec


@dataclass(frozen=True)
class EvalModel:
    """One evaluated model. role: base (run.model), trained (this run's train stage or a solopo
    checkpoint with a training record), model (anything else); algo/mode when known."""

    label: str
    path: str
    role: Literal["base", "trained", "model"]
    algo: str | None = None
    mode: str | None = None
    trained_here: bool = False  # by this run's train stage: eval adds its results to the model card


def training_record(path: str) -> dict[str, Any] | None:
    """algo/mode of a checkpoint solopo trained (its train_result.json / all_results.json), else None."""
    for name in ("train_result.json", "all_results.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                rec = json.loads(f.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("mode"):
                return {"algo": rec.get("algo"), "mode": rec["mode"]}
    return None


class EvalStage(Stage):
    """Evaluates the base model, the model trained in this run dir, and `eval.models`."""

    name = "eval"
    Config = EvalConfig
    after = "train"
    reads = ("model_path",)
    writes = ("model", "dataset", "target_len", "depth", "id", "prediction", "sub_em", "finish_reason")
    version = "2"

    # --- settings taken from the run -------------------------------------------------------------
    def max_tokens(self) -> tuple[int, str]:
        """(generation budget, where it came from): eval.max_tokens, else the run's sample.max_tokens."""
        if self.config.max_tokens is not None:
            return self.config.max_tokens, "eval.max_tokens"
        return int(self.ctx.config.sample.max_tokens), "sample.max_tokens"

    def synth_config(self, depth: float | None):
        """The run's synth settings (templates, short_docs, tolerance...) at eval's lengths and depth."""
        base = self.ctx.config.synth
        return base.model_copy(
            update={
                "target_len": list(self.config.lengths),
                "short_docs": self.config.short_docs or base.short_docs,
                "gold_position": "random" if depth is None else depth,
                "on_unreachable": "skip",  # a question with too few paragraphs is dropped and counted
            }
        )

    def _models(self, data: pa.Table | None) -> list[EvalModel]:
        from solopo.models import EMBEDDED_NAME, resolve_model

        models: list[EvalModel] = []
        if self.config.include_base:
            name = self.ctx.run.model or EMBEDDED_NAME
            if Path(name).expanduser().exists():
                name = Path(name).expanduser().resolve().name  # a short label; report.json maps it to the path
            base_label = f"base ({name})"
            models.append(EvalModel(base_label, resolve_model(self.ctx.run.model), "base"))
        if data is not None:
            for row in data.to_pylist():
                label = row.get("label") or f"{row.get('algo', 'trained')}-{row.get('mode', '')}".strip("-")
                models.append(EvalModel(label, row["model_path"], "trained", row.get("algo"), row.get("mode"), True))
        for spec in self.config.models:
            label, path = parse_model_spec(spec)
            path = resolve_model(path)
            rec = training_record(path)
            if rec:
                models.append(EvalModel(label, path, "trained", rec["algo"], rec["mode"]))
            else:
                models.append(EvalModel(label, path, "model"))
        if not models:
            raise ConfigError(["eval: no model to evaluate (include_base is false and no models given)"])
        labels = [m.label for m in models]
        if len(set(labels)) != len(labels):
            raise ConfigError([f"eval: model labels must be unique, got {labels}; name them with label=path"])
        return models

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {}
        for spec in self.config.models:
            _, path = parse_model_spec(spec)
            if Path(path).is_dir():
                fp[spec] = dir_fingerprint(path)["sha256"]
        # Settings eval takes from other sections: `solopo eval` has no upstream key that would carry them.
        fp["max_tokens"] = self.max_tokens()[0]
        fp["synth"] = self.synth_config(None).model_dump(
            mode="json", include={"doc_template", "prompt_template", "short_docs", "tolerance", "max_misses"}
        )
        return fp

    def _dropper(self, ds: str):
        def drop(reason: str, n: int = 1, example: str | None = None) -> None:
            self.ctx.drop(f"{ds}:{reason}", n=n, example=example)

        return drop

    def _train_ids(self) -> set[str]:
        """Ids the model was trained on in this run dir (the load stage's output), to exclude from eval."""
        from solopo.pipeline.io import read_parquet

        ids: set[str] = set()
        path = self.ctx.upstream_dirs.get("load", Path("/nonexistent")) / "data.parquet"
        if path.exists():
            ids |= set(read_parquet(path).column("id").to_pylist())
        if self.config.exclude_from:
            ids |= exclude_ids_from(self.config.exclude_from)
        return ids

    def _eval_set(self, tokenizer) -> pa.Table:
        from solopo.datasets import load_records, records_to_table
        from solopo.stages.contexts import build_contexts

        train_ids = self._train_ids()
        tables = []
        for ds in self.config.datasets:
            source = self.config.musique_source if ds == "musique" else self.config.hotpotqa_source
            # Over-read so that dropped records (no reachable context, overlap) still leave n_questions.
            records = load_records(
                source,
                dataset=ds,
                split="validation",
                answerable_only=True,
                on_bad_record="skip",
                limit=None,
                drop=self._dropper(ds),
            )
            kept = []
            for r in records:
                if r.id in train_ids:
                    self.ctx.drop(f"{ds}:overlaps_training_ids", example=r.id)
                    continue
                kept.append(r)
            if train_ids and len(kept) < len(records):
                self.ctx.note(
                    f"{len(records) - len(kept)} {ds} eval questions overlapped training ids and were removed"
                )
            pool = kept  # distractors come from every held-out record, not only the evaluated ones
            kept = kept[: self.config.n_questions]
            if not kept:
                raise SolopoError(f"eval: no {ds} questions left from {source} after excluding training ids")
            depths: list[float | None] = list(self.config.depths) if self.config.depths else [None]
            for depth in depths:
                built = build_contexts(
                    records_to_table(kept),
                    tokenizer,
                    self.synth_config(depth),
                    seed=self.ctx.run.seed,
                    drop=self._dropper(ds),
                    pool=pool,
                )
                built = built.append_column("depth", pa.array([-1.0 if depth is None else depth] * built.num_rows))
                tables.append(built)
        return pa.concat_tables(tables, promote_options="default")

    # --- generation --------------------------------------------------------------------------------
    def _backend(self, path: str):
        """The generation engine for one model: the local backend, or Ray Data replicas of it (eval.engine)."""
        from solopo.engines import open_backend

        self.ctx.stat("engine", self.config.engine)
        return open_backend(
            self.config,
            self.config.backend,
            path,
            ctx_note=self.ctx.note,
            trust_remote_code=self.ctx.run.trust_remote_code,
            batch_size=self.config.batch_size,
            tensor_parallel_size=self.config.tensor_parallel_size,
        )

    def _generate(self, backend, label: str, prompts: list[str], max_tokens: int) -> list:
        """Greedy answers, one per prompt: the one place eval calls a generation engine."""
        if not prompts:
            return []
        with tqdm(total=len(prompts), desc=f"eval {label}", unit="q", dynamic_ncols=True) as bar:

            def progress(n_done: int, n_tokens: int) -> None:
                bar.update(n_done)
                bar.set_postfix(tokens=n_tokens)

            gens = backend.generate(
                prompts,
                n=1,
                temperature=0.0,
                top_p=1.0,
                max_tokens=max_tokens,
                seed=self.ctx.run.seed,
                progress=progress,
            )
        return [g[0] for g in gens]

    def _fit_context(self, backend, model: EvalModel, rows: list[dict], max_tokens: int) -> list[dict]:
        """Rows whose prompt + max_tokens fits the model's context. A (dataset, length) cell with any prompt
        that does not fit is skipped whole for this model (a partial cell would score an easier subset) and
        reported as NA_CONTEXT, never as a measured 0."""
        limit = backend.max_context
        if limit is None:
            return rows
        lengths = backend.prompt_lengths([r["long_prompt"] for r in rows])
        over: dict[tuple[str, int], list[int]] = defaultdict(list)
        cell_sizes: dict[tuple[str, int], int] = defaultdict(int)
        for r, n in zip(rows, lengths, strict=True):
            cell = (r["dataset"], int(r["target_len"]))
            cell_sizes[cell] += 1
            if n + max_tokens > limit:
                over[cell].append(n)
        for (ds, tl), ns in sorted(over.items()):
            skip = {
                "model": model.label,
                "dataset": ds,
                "target_len": tl,
                "prompts": cell_sizes[(ds, tl)],
                "prompts_over": len(ns),
                "max_prompt_tokens": max(ns),
                "max_tokens": max_tokens,
                "model_context": int(limit),
            }
            self._skipped.append(skip)
            self.ctx.drop("exceeds_context", n=cell_sizes[(ds, tl)], example=f"{model.label}/{ds}@{tl}")
            self.ctx.note(
                f"{model.label}: {ds} at {format_length(tl)} skipped ({NA_CONTEXT}): {len(ns)} of "
                f"{cell_sizes[(ds, tl)]} prompts need up to {max(ns)} + max_tokens {max_tokens} tokens, "
                f"more than the model's context of {limit}"
            )
        return [r for r in rows if (r["dataset"], int(r["target_len"])) not in over]

    def run(self, data: pa.Table | None) -> pa.Table:
        from transformers import AutoTokenizer

        from solopo.metrics import extract_final_answer, sub_em

        models = self._models(data)
        max_tokens, budget_from = self.max_tokens()
        self._models_info: list[dict[str, Any]] = [asdict(m) for m in models]
        self._skipped: list[dict[str, Any]] = []
        tokenizer = AutoTokenizer.from_pretrained(models[0].path, trust_remote_code=self.ctx.run.trust_remote_code)
        evalset = self._eval_set(tokenizer)
        rows = evalset.to_pylist()
        self.ctx.stat("n_eval_prompts", len(rows))
        self.ctx.stat("mean_long_tokens", round(sum(r["long_tokens"] for r in rows) / max(1, len(rows)), 1))
        self.ctx.stat("max_tokens", max_tokens)
        self.ctx.stat("max_tokens_from", budget_from)
        self.ctx.stat("match", self.config.match)
        out: dict[str, list] = defaultdict(list)
        for model, info in zip(models, self._models_info, strict=True):
            backend = self._backend(model.path)
            info["backend"] = backend.name
            info["dtype"] = str(getattr(backend, "dtype", "engine default"))
            info["backend_settings"] = dict(getattr(backend, "settings", {}))  # engine options, when it states them
            try:
                fits = self._fit_context(backend, model, rows, max_tokens)
                log.info("[eval] %s (%s): %d prompts", model.label, model.path, len(fits))
                gens = self._generate(backend, model.label, [r["long_prompt"] for r in fits], max_tokens)
            finally:
                backend.close()
            for r, g in zip(fits, gens, strict=True):
                pred = extract_final_answer(g.text)
                out["model"].append(model.label)
                out["model_path"].append(model.path)
                out["dataset"].append(r["dataset"])
                out["target_len"].append(r["target_len"])
                out["long_tokens"].append(r["long_tokens"])
                out["depth"].append(r["depth"])
                out["id"].append(r["id"])
                out["answers"].append(r["answers"])
                out["output"].append(g.text)
                out["finish_reason"].append(g.finish_reason)
                out["output_tokens"].append(g.num_tokens)
                out["prediction"].append(pred)
                out["sub_em"].append(bool(pred is not None and sub_em(pred, r["answers"], match=self.config.match)))
                out["backend"].append(backend.name)
                out["dtype"].append(info["dtype"])
        self.ctx.stat("cells_exceeding_context", len(self._skipped))
        if not out:
            raise SolopoError(
                "eval: no prompt fits any model's context (see the notes above); use shorter --lengths or a "
                "smaller eval.max_tokens"
            )
        return pa.table(dict(out))

    def report_settings(self, table: pa.Table) -> dict[str, Any]:
        """Everything a reader of report.json needs to know how the numbers were made."""
        from solopo.pipeline.runner import library_versions

        c = self.config
        max_tokens, budget_from = self.max_tokens()
        synth = self.synth_config(None)
        # Questions actually scored per cell: synth drops questions whose context cannot reach a length.
        per_cell = sorted(set(_cell_sizes(table.to_pylist()).values()))
        return {
            "n_questions_requested": c.n_questions,
            "n_per_cell": per_cell,
            "datasets": list(c.datasets),
            "sources": {ds: c.musique_source if ds == "musique" else c.hotpotqa_source for ds in c.datasets},
            "lengths": list(c.lengths),
            "depths": None if c.depths is None else list(c.depths),
            "decoding": "greedy (temperature 0), one answer per prompt",
            "max_tokens": max_tokens,
            "max_tokens_from": budget_from,
            "match": c.match,
            "metric": f"sub-EM ({c.match} rule) of the final answer extracted from the chain of thought",
            "seed": self.ctx.run.seed,
            "bootstrap": {"resamples": c.bootstrap_resamples, "seed": c.bootstrap_seed},
            "confidence": stats.CONFIDENCE,
            "backend_requested": c.backend,
            "batch_size": c.batch_size,
            "synth": synth.model_dump(
                mode="json", include={"doc_template", "prompt_template", "short_docs", "tolerance", "max_misses"}
            ),
            "exclude_from": c.exclude_from,
            "versions": library_versions(),
        }

    def finalize(self, table: pa.Table) -> pa.Table:
        report = summarize(
            table.to_pylist(),
            models=getattr(self, "_models_info", None),
            skipped=getattr(self, "_skipped", ()),
            settings=self.report_settings(table),
            resamples=self.config.bootstrap_resamples,
            seed=self.config.bootstrap_seed,
        )
        out = self.ctx.out_dir
        plot_accuracy(report, out / "accuracy_vs_length.png")
        plots = ["accuracy_vs_length.png"]
        if report["depth"]:
            plot_depth(report, out / "accuracy_vs_depth.png")
            plots.append("accuracy_vs_depth.png")
        report["plots"] = plots
        write_json(report, out / "report.json")
        write_text(report_markdown(report), out / "report.md")
        self._add_to_model_cards(report)
        return table

    def _add_to_model_cards(self, report: dict[str, Any]) -> None:
        """Put each model trained in this run's eval table (and its comparisons) into its model card. Models
        passed with --model are inputs, not outputs: their dirs are fingerprinted, so they are left unchanged."""
        from solopo.training.model_card import add_eval_results

        s = report["settings"]
        for m in report["model_info"]:
            if not m.get("trained_here"):
                continue
            if not (Path(m["path"]) / "README.md").exists():
                self.ctx.note(f"{m['label']}: {m['path']} has no model card (README.md); eval results not added")
                continue
            rows = [
                {
                    "dataset": a["dataset"],
                    "length": format_length(a["target_len"]),
                    "sub-EM %": format_cell(a),
                }
                for a in report["accuracy"]
                if a["model"] == m["label"]
            ]
            rows += [
                {
                    "dataset": c["dataset"],
                    "length": "all" if c["target_len"] is None else format_length(c["target_len"]),
                    "sub-EM %": f"{c['diff_pct_points']:+.1f} [{c['ci95_low_pct_points']:+.1f}, "
                    f"{c['ci95_high_pct_points']:+.1f}] points vs {c['reference']}"
                    + (" (significant)" if c["significant"] else ""),
                }
                for c in report["comparisons"]
                if c["model"] == m["label"]
            ]
            notes = (
                f"Long-context QA by `solopo eval`: sub-EM ({s.get('match')} rule) in percent with a 95% Wilson "
                f"interval and n questions per cell; greedy, max_tokens {s.get('max_tokens')}; differences vs "
                "another model in percentage points with a 95% paired bootstrap interval. Full report: the "
                "training run's `eval/report.md`."
            )
            add_eval_results(m["path"], rows, title="Evaluation", notes=notes)
            log.info("[eval] added the eval table to %s", Path(m["path"]) / "README.md")


register(EvalStage)


# --- the report ------------------------------------------------------------------------------------
def _pct(x: float) -> float:
    return round(100 * x, 4)  # enough digits that the 1-decimal report does not round twice


def _cell_sizes(rows: list[dict[str, Any]]) -> dict[tuple, int]:
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
                "significant": boot.significant,
                "model_only_correct": only_model,
                "reference_only_correct": only_ref,
                "mcnemar_p": stats.mcnemar_exact(only_model, only_ref),
                # The exact test assumes independent pairs; one question at several lengths/depths is not.
                "pairs_independent": boot.n_pairs == boot.n_clusters,
            }
        )
    return out


def detectable(cell_ns: list[int]) -> dict[str, Any]:
    """The smallest model difference each cell size can tell from noise, and questions for 10/5/2 points."""
    return {
        "rule": "half-width of the 95% interval of the difference of two independent accuracies at 50% (the "
        "widest case); asking both models the same questions narrows it when they agree on most of them",
        "by_n": [{"n": n, "difference_pct_points": _pct(stats.detectable_difference(n))} for n in sorted(set(cell_ns))],
        "questions_needed": {str(d): stats.questions_needed(d / 100) for d in (10, 5, 2)},
    }


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
            "(only-model-right vs only-reference-right). **significant** only when the interval excludes 0.",
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
                "independent (too optimistic); the bootstrap interval resamples whole questions and decides.",
            ]
        lines.append("")
    elif len(report["models"]) > 1:
        lines += ["No paired comparison: no base model and no SoLo/baseline pair among the models.", ""]

    det = report.get("detectable")
    if det and det["by_n"]:
        sizes = ", ".join(
            f"n={b['n']}: " + ("none" if b["difference_pct_points"] >= 100 else f"±{b['difference_pct_points']:.1f}")
            for b in det["by_n"]
        )
        need = det["questions_needed"]
        lines += [
            "## How many questions",
            "",
            f"Smallest difference between two models a cell of n questions can tell from noise, in points: {sizes} "
            f"({det['rule']}). To resolve 10 points ask for `--n-questions {need['10']}` per dataset, 5 points "
            f"{need['5']}, 2 points {need['2']}.",
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
            extra = ", ".join(f"{k} {m[k]}" for k in ("backend", "dtype", "algo", "mode") if m.get(k))
            lines.append(f"- `{label}`: `{path}`" + (f" ({extra})" if extra else ""))
        cut = defaultdict(lambda: [0.0, 0])
        for a in report["accuracy"]:
            if a["status"] == "measured":
                cut[a["model"]][0] += a["truncated_pct"] * a["n"]
                cut[a["model"]][1] += a["n"]
        cut_text = ", ".join(f"{m} {t / n:.1f}%" for m, (t, n) in cut.items() if n)
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


class CompareEvalStage(EvalStage):
    """`solopo eval`: the same evaluation with no train stage; models come from --model."""

    after = None
    reads = ()


def exclude_ids_from(path: str) -> set[str]:
    """Training ids from a run dir (its load/export output) or a triplet Parquet file."""
    from solopo.pipeline.io import read_parquet

    p = Path(path)
    candidates = [p] if p.is_file() else [p / "export" / "data.parquet", p / "load" / "data.parquet"]
    for c in candidates:
        if c.exists():
            return set(read_parquet(c).column("id").to_pylist())
    raise SolopoError(f"--exclude-from {path}: found neither a Parquet file nor a run dir with load/export output")
