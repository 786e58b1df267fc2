"""Stage `eval`: long-context QA at several lengths, base vs trained (and any other models), one report.

Held-out questions (MuSiQue dev: multi-hop, in domain; HotpotQA dev: out of domain) go through the same
synth machinery as training data, at each length (and optionally each gold-evidence depth); every model
answers greedily with the CoT prompt, and sub-EM against answer + aliases is the score.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import field_validator
from tqdm.auto import tqdm

from solopo.engines import EngineConfig
from solopo.pipeline.config import format_length, parse_lengths, register_preset
from solopo.pipeline.errors import ConfigError, SolopoError
from solopo.pipeline.io import dir_fingerprint, write_json, write_text
from solopo.pipeline.stage import Stage

from . import register

log = logging.getLogger("solopo")

# Shipped held-out sources per dataset (the training default is the MuSiQue *train* sample).
DEFAULT_SOURCES = {"musique": "musique-dev-sample", "hotpotqa": "hotpotqa-sample"}


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
    max_tokens: int = 256
    batch_size: int = 8
    short_docs: Literal["supporting", "own"] = "supporting"
    exclude_from: str | None = None  # run dir or triplet Parquet whose ids must not be evaluated on

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

    @field_validator("n_questions", "max_tokens", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v


register_preset(
    "cpu-demo",
    {"eval": {"lengths": [1024, 2048], "n_questions": 8, "max_tokens": 128, "batch_size": 8}},
)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'label=path' -> (label, path); 'path' -> (basename, path)."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label.strip(), path.strip()
    return Path(spec.rstrip("/")).name or spec, spec


class EvalStage(Stage):
    """Evaluates the base model, the model trained in this run dir, and `eval.models`."""

    name = "eval"
    Config = EvalConfig
    after = "train"
    reads = ("model_path",)
    writes = ("model", "dataset", "target_len", "depth", "id", "prediction", "sub_em")
    version = "1"

    def _models(self, data: pa.Table | None) -> list[tuple[str, str]]:
        from solopo.models import EMBEDDED_NAME, resolve_model

        models: list[tuple[str, str]] = []
        if self.config.include_base:
            base_label = f"base ({self.ctx.run.model or EMBEDDED_NAME})"
            models.append((base_label, resolve_model(self.ctx.run.model)))
        if data is not None:
            for row in data.to_pylist():
                label = row.get("label") or f"{row.get('algo', 'trained')}-{row.get('mode', '')}".strip("-")
                models.append((label, row["model_path"]))
        for spec in self.config.models:
            label, path = parse_model_spec(spec)
            models.append((label, resolve_model(path)))
        if not models:
            raise ConfigError(["eval: no model to evaluate (include_base is false and no models given)"])
        labels = [m[0] for m in models]
        if len(set(labels)) != len(labels):
            raise ConfigError([f"eval: model labels must be unique, got {labels}; name them with label=path"])
        return models

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {}
        for spec in self.config.models:
            _, path = parse_model_spec(spec)
            if Path(path).is_dir():
                fp[spec] = dir_fingerprint(path)["sha256"]
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
        from solopo.stages.synth import SynthConfig, build_contexts

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
                synth_cfg = SynthConfig(
                    target_len=self.config.lengths,
                    short_docs=self.config.short_docs,
                    gold_position="random" if depth is None else depth,
                    on_unreachable="skip",
                )
                built = build_contexts(
                    records_to_table(kept),
                    tokenizer,
                    synth_cfg,
                    seed=self.ctx.run.seed,
                    drop=self._dropper(ds),
                    pool=pool,
                )
                built = built.append_column("depth", pa.array([-1.0 if depth is None else depth] * built.num_rows))
                tables.append(built)
        return pa.concat_tables(tables, promote_options="default")

    def run(self, data: pa.Table | None) -> pa.Table:
        from transformers import AutoTokenizer

        from solopo.engines import open_backend
        from solopo.metrics import extract_final_answer, sub_em

        models = self._models(data)
        tokenizer = AutoTokenizer.from_pretrained(models[0][1], trust_remote_code=self.ctx.run.trust_remote_code)
        evalset = self._eval_set(tokenizer)
        rows = evalset.to_pylist()
        self.ctx.stat("n_eval_prompts", len(rows))
        self.ctx.stat("mean_long_tokens", round(sum(r["long_tokens"] for r in rows) / max(1, len(rows)), 1))
        out: dict[str, list] = defaultdict(list)
        for label, path in models:
            log.info("[eval] %s (%s): %d prompts", label, path, len(rows))
            backend = open_backend(
                self.config,
                self.config.backend,
                path,
                ctx_note=self.ctx.note,
                trust_remote_code=self.ctx.run.trust_remote_code,
                batch_size=self.config.batch_size,
                tensor_parallel_size=self.config.tensor_parallel_size,
            )
            self.ctx.stat("backend", backend.name)
            self.ctx.stat("engine", self.config.engine)
            self.ctx.stat("dtype", getattr(backend, "dtype", "engine default"))
            for k, v in getattr(backend, "settings", {}).items():
                self.ctx.stat(f"backend_{k}", v)
            with tqdm(total=len(rows), desc=f"eval {label}", unit="q", dynamic_ncols=True) as bar:

                def progress(n_done: int, n_tokens: int, bar=bar) -> None:
                    bar.update(n_done)
                    bar.set_postfix(tokens=n_tokens)

                gens = backend.generate(
                    [r["long_prompt"] for r in rows],
                    n=1,
                    temperature=0.0,
                    top_p=1.0,
                    max_tokens=self.config.max_tokens,
                    seed=self.ctx.run.seed,
                    progress=progress,
                )
            if hasattr(backend, "close"):
                backend.close()
            for r, g in zip(rows, gens, strict=True):
                text = g[0].text
                pred = extract_final_answer(text)
                out["model"].append(label)
                out["model_path"].append(path)
                out["dataset"].append(r["dataset"])
                out["target_len"].append(r["target_len"])
                out["long_tokens"].append(r["long_tokens"])
                out["depth"].append(r["depth"])
                out["id"].append(r["id"])
                out["answers"].append(r["answers"])
                out["output"].append(text)
                out["prediction"].append(pred)
                out["sub_em"].append(bool(pred is not None and sub_em(pred, r["answers"])))
        return pa.table(dict(out))

    def finalize(self, table: pa.Table) -> pa.Table:
        report = summarize(table.to_pylist())
        write_json(report, self.ctx.out_dir / "report.json")
        write_text(report_markdown(report), self.ctx.out_dir / "report.md")
        plot_accuracy(report, self.ctx.out_dir / "accuracy_vs_length.png")
        if any(d >= 0 for d in table.column("depth").to_pylist()):
            plot_depth(report, self.ctx.out_dir / "accuracy_vs_depth.png")
        return table


register(EvalStage)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per (model, dataset, length) and per (model, dataset, length, depth)."""
    by_len: dict[tuple, list[bool]] = defaultdict(list)
    by_depth: dict[tuple, list[bool]] = defaultdict(list)
    tokens: dict[tuple, list[int]] = defaultdict(list)
    for r in rows:
        by_len[(r["model"], r["dataset"], r["target_len"])].append(r["sub_em"])
        tokens[(r["model"], r["dataset"], r["target_len"])].append(r["long_tokens"])
        if r["depth"] >= 0:
            by_depth[(r["model"], r["dataset"], r["target_len"], r["depth"])].append(r["sub_em"])
    models = list(dict.fromkeys(r["model"] for r in rows))
    return {
        "models": models,
        "datasets": sorted({r["dataset"] for r in rows}),
        "lengths": sorted({r["target_len"] for r in rows}),
        "accuracy": [
            {
                "model": m,
                "dataset": d,
                "target_len": n,
                "n": len(v),
                "sub_em": sum(v) / len(v),
                "mean_tokens": sum(tokens[(m, d, n)]) / len(v),
            }
            for (m, d, n), v in by_len.items()
        ],
        "depth": [
            {"model": m, "dataset": d, "target_len": n, "depth": p, "n": len(v), "sub_em": sum(v) / len(v)}
            for (m, d, n, p), v in by_depth.items()
        ],
    }


def report_markdown(report: dict[str, Any]) -> str:
    acc = {(a["model"], a["dataset"], a["target_len"]): a for a in report["accuracy"]}
    lines = ["# Long-context QA (sub-EM, %)", ""]
    cols = [(d, n) for d in report["datasets"] for n in report["lengths"]]
    lines.append("| model | " + " | ".join(f"{d} {format_length(n)}" for d, n in cols) + " | mean |")
    lines.append("|---|" + "---:|" * (len(cols) + 1))
    for m in report["models"]:
        vals = [acc.get((m, d, n)) for d, n in cols]
        cells = [f"{100 * v['sub_em']:.1f} (n={v['n']})" if v else "-" for v in vals]
        got = [v["sub_em"] for v in vals if v]
        mean = f"{100 * sum(got) / len(got):.1f}" if got else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
    if report["depth"]:
        lines += [
            "",
            "## By gold-evidence depth",
            "",
            "| model | dataset | length | depth | sub-EM % | n |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for a in sorted(report["depth"], key=lambda a: (a["model"], a["dataset"], a["target_len"], a["depth"])):
            lines.append(
                f"| {a['model']} | {a['dataset']} | {format_length(a['target_len'])} | {a['depth']:.2f} | "
                f"{100 * a['sub_em']:.1f} | {a['n']} |"
            )
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    datasets = report["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        for m in report["models"]:
            pts = sorted(
                (a["target_len"], 100 * a["sub_em"])
                for a in report["accuracy"]
                if a["model"] == m and a["dataset"] == d
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["lengths"], [format_length(n) for n in report["lengths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("sub-EM (%)")
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
        groups[(a["model"], a["dataset"], a["target_len"])].append((a["depth"], 100 * a["sub_em"]))
    for (m, d, n), pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{m} / {d} / {format_length(n)}")
    ax.set_xlabel("gold evidence depth (fraction of context)")
    ax.set_ylabel("sub-EM (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
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
