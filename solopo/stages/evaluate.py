"""Stage `eval`: long-context QA at several lengths, base vs trained (and any other models), one report.

Held-out questions (MuSiQue dev: multi-hop, in domain; HotpotQA dev: out of domain) go through the same
synth machinery as training data, with the run's synth settings (templates, short_docs, tolerance), at each
length (and optionally each gold-evidence depth); every model answers greedily with the CoT prompt and the
run's sampling budget (sample.max_tokens unless eval.max_tokens is set), and sub-EM against answer + aliases
is the score. The report gives each cell a Wilson 95% interval and compares models on the same questions
(paired bootstrap interval, exact McNemar test); report.json stands alone (units, settings, model paths).
This module is the stage (config, eval set, generation, scoring); solopo.stages.eval_report builds the report.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from solopo import stats
from solopo.chat import chat_format
from solopo.engines import EngineConfig
from solopo.pipeline.config import format_length, parse_lengths, register_preset
from solopo.pipeline.errors import ConfigError, SolopoError
from solopo.pipeline.io import dir_fingerprint, path_in_run, resolve_in_run, write_json, write_text
from solopo.pipeline.stage import Stage

from . import register
from .eval_report import (
    NA_CONTEXT,
    add_to_model_cards,
    cell_sizes,
    plot_accuracy,
    plot_depth,
    report_markdown,
    summarize,
)

log = logging.getLogger("solopo")

# Shipped held-out sources per dataset (the training default is the MuSiQue *train* sample).
DEFAULT_SOURCES = {"musique": "musique-dev-sample", "hotpotqa": "hotpotqa-sample"}


class EvalConfig(EngineConfig):  # + engine: local | ray, ray_address, replicas (solopo.engines)
    lengths: list[int] = Field(default=[4096, 8192], description="context lengths to evaluate at: 4k,8k")
    datasets: list[Literal["musique", "hotpotqa"]] = Field(
        default=["musique", "hotpotqa"], description="held-out QA sets"
    )
    musique_source: str = Field(
        default=DEFAULT_SOURCES["musique"], description="MuSiQue dev: shipped sample, path or hub id"
    )
    hotpotqa_source: str = Field(
        default=DEFAULT_SOURCES["hotpotqa"], description="HotpotQA dev: shipped sample, path or hub id"
    )
    n_questions: int = Field(default=100, description="questions per dataset; the same questions at every length")
    depths: list[float] | None = Field(
        default=None, description="gold-evidence depth sweep, e.g. [0, 0.25, 0.5, 0.75, 1]; None = random"
    )
    include_base: bool = Field(default=True, description="also evaluate run.model (the untrained base)")
    models: list[str] = Field(default=[], description='extra models to compare: "label=path" or a path/hub id')
    backend: Literal["auto", "vllm", "transformers"] = Field(
        default="auto", description="auto = vLLM when importable, else transformers (announced)"
    )
    # None = the run's sample.max_tokens: a smaller budget cuts chains of thought before "The answer is:".
    max_tokens: int | None = Field(default=None, description="generation budget; None = the run's sample.max_tokens")
    batch_size: int = Field(default=8, description="prompts per generate call (transformers backend)")
    short_docs: Literal["supporting", "own"] | None = Field(
        default=None, description="distractor order as in synth; None = the run's synth.short_docs"
    )
    match: Literal["word", "substring"] = Field(
        default="word", description="sub-EM rule: word (whole tokens) or substring (the paper's raw containment)"
    )
    exclude_from: str | None = Field(
        default=None, description="run dir or triplet Parquet whose ids must not be evaluated on"
    )
    bootstrap_resamples: int = Field(
        default=stats.BOOTSTRAP_RESAMPLES, description="paired bootstrap resamples of the questions"
    )
    bootstrap_seed: int = Field(default=0, description="fixed, so the report's intervals do not move between reruns")

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

    # bf16 greedy decoding flips near-tied tokens: in the cpu-demo a 3-step update looked like a truncation jump.
    dtype: Literal["default", "auto", "bfloat16", "float16", "float32"] = Field(
        default="default",
        description="inference dtype: default = float32 on CPU, the training dtype on GPU (train.dtype auto = "
        "bfloat16); auto = the engine's choice; the report records the dtype each engine ran",
    )


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
    training: dict[str, Any] | None = None  # algo, mode, alpha, beta, lr, steps, rows... of a trained model


# The model card's settings table (solopo.training.model_card.write_model_card): label -> training key.
_CARD_SETTINGS = {
    "algorithm": "algo",
    "mode": "mode",
    "alpha (SoLo-RA weight)": "alpha",
    "beta": "beta",
    "learning rate": "lr",
    "optimizer steps": "steps",
    "training examples": "rows",
    "long context length (tokens)": "target_len",
    "training dtype": "dtype",
}
_CARD_ROW = re.compile(r"^\|\s*(.+?)\s*\|\s*(.*?)\s*\|\s*$", re.M)


def _number(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v or None


def training_record(path: str) -> dict[str, Any] | None:
    """The training settings of a checkpoint solopo trained (algo, mode, alpha, beta, lr, steps, rows...), read
    from its model card's settings table, HF's all_results.json / trainer_state.json and train_result.json;
    None when it has no solopo training record (no algo and mode)."""
    d = Path(path)
    if not d.is_dir():
        return None
    rec: dict[str, Any] = {}
    card = d / "README.md"
    if card.is_file():
        for label, value in _CARD_ROW.findall(card.read_text(errors="replace")):
            if label in _CARD_SETTINGS:
                rec[_CARD_SETTINGS[label]] = _number(value)
    for name in ("all_results.json", "trainer_state.json", "train_result.json"):
        f = d / name
        try:
            got = json.loads(f.read_text()) if f.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(got, dict):
            continue
        if name == "all_results.json" and "train_samples" in got:
            rec.setdefault("rows", got["train_samples"])
        elif name == "trainer_state.json" and "global_step" in got:
            rec.setdefault("steps", got["global_step"])
        elif name == "train_result.json":
            for k in ("algo", "mode", "alpha", "beta", "lr", "steps"):
                if got.get(k) is not None:
                    rec.setdefault(k, got[k])
            if got.get("examples") is not None:
                rec.setdefault("rows", got["examples"])
    if not (rec.get("algo") and rec.get("mode")):
        return None
    return {k: rec.get(k) for k in ("algo", "mode", "alpha", "beta", "lr", "steps", "rows", "target_len", "dtype")}


def effective_dtype(backend: Any, requested: str) -> tuple[str, str]:
    """(dtype the engine computes in, where that came from). Never "auto": the engine's own report when it has
    one (`effective_dtype`, set once it started), else the dtype it was asked for, else what it resolved, else
    the rule both backends apply to "auto" on this machine (solopo.hardware)."""
    got = getattr(backend, "effective_dtype", None)
    if got:
        return str(got).removeprefix("torch."), "reported by the engine"
    if requested != "auto":
        return requested, "requested (eval.dtype)"
    own = str(getattr(backend, "dtype", "auto"))
    if "auto" not in own and own not in ("", "none", "engine default"):
        return own.removeprefix("torch."), "resolved by the backend"
    import torch

    from solopo.hardware import cpu_has_native_bf16

    guess = "bfloat16" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32"
    return guess, "not reported by the engine: solopo.hardware's rule for auto (bf16 on GPUs and bf16 CPUs)"


class EvalStage(Stage):
    """Evaluates the base model, the model trained in this run dir, and `eval.models`."""

    name = "eval"
    Config = EvalConfig
    after = "train"
    reads = ("model_path",)
    writes = ("model", "dataset", "target_len", "depth", "id", "prediction", "sub_em", "finish_reason")
    version = "2"
    expensive = True

    @property
    def run_dir(self) -> Path:
        return Path(self.ctx.run.run_dir)

    def stored(self, path: str) -> str:
        return path_in_run(path, self.run_dir)

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

    def _train_setting(self, key: str) -> Any:
        train = getattr(self.ctx.config, "train", None)
        return getattr(train, key, None)

    def inference_dtype(self) -> tuple[str, str]:
        """(dtype asked of the engine, why): eval.dtype, else fp32 on CPU and the training dtype on GPU."""
        c = self.config.dtype
        if c != "default":
            return c, f"eval.dtype={c}"
        import torch

        if not torch.cuda.is_available():
            return "float32", "default on CPU: bf16 greedy decoding flips near-tied tokens"
        train = str(self._train_setting("dtype") or "auto")
        return {"fp32": "float32"}.get(train, "bfloat16"), f"default on GPU: the training dtype (train.dtype={train})"

    def _models(self, data: pa.Table | None) -> list[EvalModel]:
        from solopo.models import EMBEDDED_NAME, resolve_model
        from solopo.training import peft as lora

        models: list[EvalModel] = []
        if self.config.include_base:
            name = self.ctx.run.model or EMBEDDED_NAME
            if Path(name).expanduser().exists():
                name = Path(name).expanduser().resolve().name  # a short label; report.json maps it to the path
            base_label = f"base ({name})"
            models.append(
                EvalModel(base_label, resolve_model(self.ctx.run.model, self.ctx.run.trust_remote_code), "base")
            )
        if data is not None:
            for row in data.to_pylist():
                label = row.get("label") or f"{row.get('algo', 'trained')}-{row.get('mode', '')}".strip("-")
                path = resolve_in_run(row["model_path"], self.run_dir)  # stored relative to the run dir
                # The train stage's row, then what the model's card states (the resolved dtype, lr).
                training = {
                    "algo": row.get("algo"),
                    "mode": row.get("mode"),
                    "alpha": row.get("alpha"),
                    "beta": row.get("beta"),
                    "lr": self._train_setting("lr"),
                    "steps": row.get("steps"),
                    "rows": row.get("examples"),
                    "target_len": row.get("target_len"),
                    "dtype": None,
                }
                card = training_record(path) or {}
                training.update({k: v for k, v in card.items() if v is not None})
                models.append(EvalModel(label, path, "trained", row.get("algo"), row.get("mode"), True, training))
        for spec in self.config.models:
            label, path = parse_model_spec(spec)
            path = (
                str(Path(path).expanduser().resolve())
                if lora.is_adapter_dir(path)
                else resolve_model(path, self.ctx.run.trust_remote_code, label=f"-m {spec}")
            )
            rec = training_record(path)
            if rec:
                models.append(EvalModel(label, path, "trained", rec["algo"], rec["mode"], training=rec))
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
        fp["dtype"] = self.inference_dtype()[0]  # follows train.dtype on GPU
        fp["synth"] = self.synth_config(None).model_dump(
            mode="json", include={"doc_template", "prompt_template", "short_docs", "tolerance", "max_misses"}
        )
        fp.update(chat_format(self.ctx.run).fingerprint())  # run.chat_template/system_prompt; none by default
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
                    chat=chat_format(self.ctx.run),
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
            dtype=self.inference_dtype()[0],
            batch_size=self.config.batch_size,
            tensor_parallel_size=self.config.tensor_parallel_size,
            log_file=self.ctx.out_dir / "vllm.log",  # vLLM's own output, off the console (issue 26.1)
            chat=chat_format(self.ctx.run),  # every model answers prompts in the run's chat format
        )

    def _generation_path(self, model: EvalModel, info: dict[str, Any]) -> str:
        """A LoRA adapter dir (train.merge_adapter=false) is evaluated merged into its base; recorded per model."""
        from solopo.training import peft as lora

        if not lora.is_adapter_dir(model.path):
            return model.path
        path, info["adapter"] = lora.merged_for_eval(model.path, self.ctx.out_dir / "merged", self.ctx.note)
        self._adapters[model.label] = info["adapter"]
        return path

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
        # paths inside the run dir are stored relative to it (report.json, the table), as train stores them
        self._models_info: list[dict[str, Any]] = [{**asdict(m), "path": self.stored(m.path)} for m in models]
        self._skipped: list[dict[str, Any]] = []
        tokenizer = AutoTokenizer.from_pretrained(models[0].path, trust_remote_code=self.ctx.run.trust_remote_code)
        chat_format(self.ctx.run).check(tokenizer)
        evalset = self._eval_set(tokenizer)
        rows = evalset.to_pylist()
        self.ctx.stat("n_eval_prompts", len(rows))
        self.ctx.stat("mean_long_tokens", round(sum(r["long_tokens"] for r in rows) / max(1, len(rows)), 1))
        self.ctx.stat("max_tokens", max_tokens)
        self.ctx.stat("max_tokens_from", budget_from)
        self.ctx.stat("match", self.config.match)
        out: dict[str, list] = defaultdict(list)
        self._adapters: dict[str, dict[str, Any]] = {}
        for model, info in zip(models, self._models_info, strict=True):
            backend = self._backend(self._generation_path(model, info))
            info["backend"] = backend.name
            info["dtype"], info["dtype_from"] = effective_dtype(backend, self.inference_dtype()[0])
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
                out["model_path"].append(info["path"])
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
        per_cell = sorted(set(cell_sizes(table.to_pylist()).values()))
        return {
            "n_questions_requested": c.n_questions,
            "n_per_cell": per_cell,
            "datasets": list(c.datasets),
            "sources": {
                ds: self.display_path(c.musique_source if ds == "musique" else c.hotpotqa_source) for ds in c.datasets
            },
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
            "dtype_requested": self.inference_dtype()[0],
            "dtype_requested_from": self.inference_dtype()[1],
            "batch_size": c.batch_size,
            "synth": synth.model_dump(
                mode="json", include={"doc_template", "prompt_template", "short_docs", "tolerance", "max_misses"}
            ),
            "exclude_from": None if c.exclude_from is None else self.display_path(c.exclude_from),
            "chat": chat_format(self.ctx.run).settings(),  # a template file by its name: no machine path
            "adapters": getattr(self, "_adapters", {}),  # label -> how a LoRA adapter dir was evaluated
            "versions": library_versions(),
        }

    def display_path(self, path: str, model: str | None = None, is_model: bool = False) -> str:
        """A path as report.md/json show it: relative to the run dir when inside it, else for a model its hub id
        (the HF cache's models--Org--Name, the embedded model's id; `model` as the user gave it), else the
        folder's or file's name; never a machine path."""
        from solopo.training.model_card import base_model_id

        p = Path(path).expanduser()
        if not p.exists():
            return path  # a hub id or a shipped dataset name
        try:
            return p.resolve().relative_to(self.run_dir.expanduser().resolve()).as_posix()
        except ValueError:
            return base_model_id(model, str(p)) if is_model else p.name

    def run_identity(self) -> dict[str, Any]:
        """Which run made the report: run dir name, when, and a hash of its whole config (run_dir left out, so
        the same settings in another directory hash the same)."""
        from datetime import datetime, timezone

        from solopo.pipeline.config import config_to_dict
        from solopo.pipeline.io import stable_hash

        cfg = config_to_dict(self.ctx.config)
        cfg.get("run", {}).pop("run_dir", None)
        return {
            "run_id": Path(self.ctx.run.run_dir).expanduser().resolve().name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config_sha256": stable_hash(cfg),
            "seed": self.ctx.run.seed,
        }

    def finalize(self, table: pa.Table) -> pa.Table:
        models = getattr(self, "_models_info", None)
        shown = None
        if models is not None:
            base = self.ctx.run.model
            shown = [
                {
                    **m,
                    "path": self.display_path(
                        resolve_in_run(m["path"], self.run_dir),
                        base if m["role"] == "base" else m["path"],
                        is_model=True,
                    ),
                }
                for m in models
            ]
        report = summarize(
            table.to_pylist(),
            models=shown,
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
        report = {"run": self.run_identity(), **report}
        write_json(report, out / "report.json")
        write_text(report_markdown(report), out / "report.md")
        add_to_model_cards(report, self.ctx.note, self.run_dir)
        return table


register(EvalStage)


class CompareEvalStage(EvalStage):
    """`solopo eval`: the same evaluation with no train stage; models come from --model."""

    after = None
    reads = ()


def exclude_ids_from(path: str, _seen: frozenset[str] = frozenset()) -> set[str]:
    """Training ids from a triplet Parquet file, or everything a run dir's own eval excludes: its loaded ids
    (load output, a superset of the exported ones), its export's, and its own eval.exclude_from."""
    from solopo.pipeline.config import saved_settings
    from solopo.pipeline.io import read_parquet

    p = Path(path)
    if p.is_file():
        return set(read_parquet(p).column("id").to_pylist())
    found = [c for c in (p / "load" / "data.parquet", p / "export" / "data.parquet") if c.exists()]
    if not found:
        raise SolopoError(f"--exclude-from {path}: found neither a Parquet file nor a run dir with load/export output")
    ids = set().union(*(set(read_parquet(c).column("id").to_pylist()) for c in found))
    more = ((saved_settings(p) or {}).get("eval") or {}).get("exclude_from")
    key = str(p.resolve())
    if more and key not in _seen:
        ids |= exclude_ids_from(more if Path(more).exists() else resolve_in_run(more, p), _seen | {key})
    return ids
