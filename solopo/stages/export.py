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

import functools
import hashlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from solopo.chat import ChatFormat, chat_format
from solopo.pipeline.config import StageConfig, format_length
from solopo.pipeline.errors import DataError, SolopoError
from solopo.pipeline.io import read_json, read_parquet, write_json, write_parquet, write_text
from solopo.pipeline.stage import Stage
from solopo.resources import resource_text

from . import register
from .export_card import (
    TEMPLATE,
    VIEW_DOC,
    config_entry,
    plot_lengths,
    public_model_name,
    render_card,
    view_ident,
)

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

# Slack over the longest prompt+response for what a trainer may add (BOS, EOS) before rounding to a multiple of 64.
_LENGTH_SLACK = 8


class ExportConfig(StageConfig):
    trl_view: bool = Field(default=True, description="write trl/*.parquet (prompt/chosen/rejected)")
    llamafactory: bool = Field(default=True, description="write llamafactory/ (dataset_info.json + files)")
    data_card: bool = Field(default=True, description="write the README.md data card and its plots")
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
        chat = chat_format(self.ctx.run).fingerprint()  # the TRL messages carry the system message
        if not self.config.data_card:
            return chat
        return {"template_sha256": hashlib.sha256(self._template_text().encode()).hexdigest(), **chat}

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from solopo.models import resolve_model

        path = resolve_model(self.ctx.run.model, self.ctx.run.trust_remote_code)
        self._tok = AutoTokenizer.from_pretrained(path, trust_remote_code=self.ctx.run.trust_remote_code)
        self._chat = chat_format(self.ctx.run)

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
                write_parquet(to_trl(t, kind, self._chat), d / path)
                files.append((path, f"TRL conversational prompt/chosen/rejected: {VIEW_DOC[kind]}"))
                configs.append(config_entry(f"trl_{view_ident(name)}", path, name, kind, "trl"))
        if self.config.llamafactory:
            info = {}
            for name, (kind, t) in views.items():
                entry = f"{self.config.name}_{view_ident(name)}"
                fname = f"{entry}.parquet"
                write_parquet(to_alpaca(t, kind, self._chat), d / "llamafactory" / fname)
                info[entry] = {
                    "file_name": fname,
                    "formatting": "alpaca",
                    "ranking": True,
                    "columns": alpaca_columns(self._chat),
                }
                configs.append(
                    config_entry(
                        f"llamafactory_{view_ident(name)}", f"llamafactory/{fname}", name, kind, "llamafactory"
                    )
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
            card = render_card(
                table,
                files,
                configs,
                lengths,
                ctx=self.ctx,
                name=self.config.name,
                template=self.config.template,
                template_text=self._template_text(),
                manifests={s: self._upstream_manifest(s) for s in ("load", "synth", "sample", "select")},
                dataset_name=self._dataset_name(),
                schema=EXPORT_SCHEMA,
                chat=self._chat,
            )
            write_text(card, d / "README.md")
        return table

    def _turn_tokens(self) -> Callable[[str], int]:
        """Tokens of one assistant turn (response + end-of-turn) as TRL and `solopo train` cut it."""
        tok, chat = self._tok, self._chat
        if chat.has_template(tok):
            from solopo.training.data import encode

            def count(text: str) -> int:
                return len(encode(tok, "x", text, chat).completion)  # the completion does not depend on the prompt
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


# LLaMA-Factory column mapping (its dataset_info `columns`): the response columns are not named chosen/rejected,
# so TRL cannot take these files as implicit-prompt data.
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "chosen": "chosen_response",
    "rejected": "rejected_response",
}


def alpaca_columns(chat: ChatFormat | None = None) -> dict[str, str]:
    """ALPACA_COLUMNS, plus LLaMA-Factory's `system` column when run.system_prompt is set."""
    system = {"system": "system"} if chat is not None and chat.system_prompt is not None else {}
    return {**ALPACA_COLUMNS, **system}


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


def to_trl(t: pa.Table, kind: str, chat: ChatFormat | None = None) -> pa.Table:
    """TRL conversational preference format: prompt = [system?, user] (the run's chat format: run.system_prompt),
    chosen/rejected = [assistant]. x_short has no length, so the short view carries no target_len."""
    chat = chat or ChatFormat()
    prompt, chosen, rejected = _view_columns(t, kind)
    cols: dict[str, Any] = {"id": t.column("id"), "pair_index": t.column("pair_index")}
    if kind != "short":
        cols["target_len"] = t.column("target_len")
    return pa.table(
        {
            **cols,
            "prompt": [chat.messages(p) for p in prompt],
            "chosen": [[{"role": "assistant", "content": c}] for c in chosen],
            "rejected": [[{"role": "assistant", "content": r}] for r in rejected],
        }
    )


def to_alpaca(t: pa.Table, kind: str, chat: ChatFormat | None = None) -> pa.Table:
    """LLaMA-Factory alpaca ranking format (columns mapped by alpaca_columns in dataset_info.json); with
    run.system_prompt a `system` column holds it (LLaMA-Factory's template renders it)."""
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
    if chat is not None and chat.system_prompt is not None:
        cols["system"] = [chat.system_prompt] * len(prompt)
    return pa.table(cols)


__all__ = [
    "ALPACA_COLUMNS",
    "alpaca_columns",
    "EXPORT_SCHEMA",
    "ExportConfig",
    "ExportStage",
    "build_views",
    "to_alpaca",
    "to_trl",
    "view_lengths",
]
