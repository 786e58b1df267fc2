"""A trained model dir's Hugging Face metadata: the README.md model card, and trainer_state.json /
train_results.json / all_results.json with HF Trainer's file names and keys, so that hub tooling, TRL users and
scripts that read Trainer outputs find what they expect.

`add_eval_results` is for the eval stage: it adds (or replaces) an evaluation table in an existing card.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from solopo.chat import ChatFormat
from solopo.pipeline.io import write_text

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default model's hub id (Apache-2.0)
_EVAL_START, _EVAL_END = "<!-- solopo:eval:start -->", "<!-- solopo:eval:end -->"

# solopo's per-step row keys -> the names HF Trainer / TRL's DPOTrainer use in log_history. Every file a user reads
# (logs.jsonl, trainer_state.json, TensorBoard/W&B) uses the HF names; only history.parquet keeps the raw row.
_HF_LOG_NAMES = {
    "lr": "learning_rate",
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
    "reward_acc": "rewards/accuracies",
    "tokens": "num_tokens",
}
# Averaged over all optimizer steps into all_results.json as train_<name>, as HF does for train_loss.
_MEANS = (
    "po_loss",
    "ra_loss",
    "ra_distance",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
)


def hf_log_row(row: dict[str, Any], steps_per_epoch: int | None = None) -> dict[str, Any]:
    """One training log row in HF's names (loss, grad_norm, learning_rate, rewards/*, num_tokens, step) with HF's
    fractional epoch (optimizer steps done / steps per epoch; from the row when steps_per_epoch is not given)."""
    out = {_HF_LOG_NAMES.get(k, k): v for k, v in row.items()}
    out["rewards/margins"] = row["reward_chosen"] - row["reward_rejected"]
    out["epoch"] = row["step"] / steps_per_epoch if steps_per_epoch else row["epoch"]
    return out


def hf_trainer_files(
    session: list[dict[str, Any]],
    history: list[dict[str, Any]],
    cfg,
    *,
    steps_per_epoch: int,
    total_steps: int,
    examples: int,
    seconds: float,
    n_params: int,
    world: int,
) -> dict[str, dict[str, Any]]:
    """{file name: content} for trainer_state.json, train_results.json and all_results.json.

    `history` holds every step's row (resumed runs included), `session` the steps this process ran (what
    train_runtime and the per-second rates cover, as in HF). total_flos is HF's estimate 6 * non-embedding
    parameters * tokens. train_loss and every other train_<metric> (po_loss, ra_loss, ra_distance, rewards/*) are
    means over all optimizer steps, as HF Trainer computes train_loss; the last step's values are in log_history."""
    from transformers import TrainerState

    steps = history[-1]["step"] if history else 0
    epoch = steps / steps_per_epoch
    tokens = sum(int(r["tokens"]) for r in history)
    flos = float(6 * n_params * tokens)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    metrics = {
        "epoch": epoch,
        "total_flos": flos,
        "train_loss": sum(r["loss"] for r in history) / max(1, len(history)),
        "train_runtime": round(seconds, 4),
        "train_samples": examples,
        "train_samples_per_second": round(len(session) * global_batch / max(seconds, 1e-9), 3),
        "train_steps_per_second": round(len(session) / max(seconds, 1e-9), 3),
    }
    last = history[-1] if history else {}
    rows = [hf_log_row(r, steps_per_epoch) for r in history]
    for k in _MEANS:  # one meaning for every train_* number: the mean over all optimizer steps, like train_loss
        if rows and k in rows[0]:
            metrics[f"train_{k}"] = sum(r[k] for r in rows) / len(rows)
    logged = [h for r, h in zip(history, rows, strict=True) if r["step"] % cfg.logging_steps == 0 or r is last]
    summary = {k: metrics[k] for k in ("train_runtime", "train_samples_per_second", "train_steps_per_second")}
    summary.update(total_flos=flos, train_loss=metrics["train_loss"], epoch=epoch, step=steps)
    state = TrainerState(
        epoch=epoch,
        global_step=steps,
        max_steps=total_steps,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps or 0,  # 0 with time-based checkpoints (train.save_minutes)
        train_batch_size=cfg.micro_batch_size,
        num_train_epochs=math.ceil(total_steps / steps_per_epoch),
        num_input_tokens_seen=tokens,
        total_flos=flos,
        log_history=[*logged, summary],
        is_local_process_zero=True,
        is_world_process_zero=True,
    )
    return {
        "trainer_state.json": dataclasses.asdict(state),
        "train_results.json": metrics,
        "all_results.json": metrics,
    }


def base_model_id(model: str | None, resolved: str) -> str:
    """What the card names as base_model: a hub id, never a machine path (the embedded default -> its hub id, a
    snapshot in the HF cache (.../models--Org--Name/snapshots/<rev>) -> Org/Name, another local dir -> its name)."""
    from solopo.models import EMBEDDED_NAME

    if model is None or model in ("embedded", EMBEDDED_NAME):
        return EMBEDDED_HUB_ID
    p = Path(resolved)
    if not p.is_dir():
        return model  # a hub id as given
    for part in p.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return p.name


def is_repo_id(name: str) -> bool:
    """True for a Hub repo id (`owner/name`, huggingface_hub's own rules); False for a bare name or a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _dataset_link(name: str) -> str:
    return f"[{name}](https://huggingface.co/datasets/{name})" if is_repo_id(name) else f"`{name}`"


def _read_card_data(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard(path.read_text()).data.to_dict()
    except Exception:  # a README without YAML metadata is no card
        return {}


def base_model_license(model: str | None, resolved: str) -> str | None:
    """The base model's licence when known: the embedded SmolLM2 is Apache-2.0; a local checkpoint's own card."""
    from solopo.models import EMBEDDED_NAME

    if model is None or model in ("embedded", EMBEDDED_NAME):
        return "apache-2.0"
    lic = _read_card_data(Path(resolved) / "README.md").get("license") if Path(resolved).is_dir() else None
    return lic if isinstance(lic, str) else None


def _table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _chat_section(chat: ChatFormat | None) -> str:
    """What a user must reproduce at inference when training used a non-default chat format; empty otherwise."""
    if chat is None or chat.is_default:
        return ""
    out = f"\n{chat.card_text()}"
    if chat.template is not None:
        out += " This directory's tokenizer carries that template (`chat_template.jinja`), so `apply_chat_template`"
        out += " and vLLM use it."
    if chat.system_prompt is not None:
        out += " Pass the same system message at inference (a `system` turn before the user's)."
    return out + "\n"


def write_model_card(
    model_dir: str | Path,
    *,
    base_model: str,
    result: dict[str, Any],
    train_config: dict[str, Any],
    datasets: list[str],
    license: str | None = None,
    chat: ChatFormat | None = None,
) -> Path:
    """Write model_dir/README.md in the standard HF model-card format (YAML metadata + markdown body).

    `result` is what training returned (algo, mode, alpha, beta, steps, examples, target_len, dtype, final);
    `datasets` the Hub ids of the source datasets (e.g. dgslibisey/MuSiQue)."""
    import huggingface_hub
    import torch
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    import solopo

    algo, mode = result["algo"], result["mode"]
    name = Path(model_dir).name
    on_hub = is_repo_id(base_model)  # a local checkpoint's name is no hub id: named in the text, not in the metadata
    peft = result.get("peft")  # LoRA/QLoRA runs: what was adapted, and whether the top level is merged
    adapter_only = bool(peft) and not peft["merged"]
    data = ModelCardData(
        base_model=base_model if on_hub else None,
        # the metadata takes Hub dataset ids only (the hub links them); other names stay in the text
        datasets=[d for d in datasets if is_repo_id(d)] or None,
        library_name="peft" if adapter_only else "transformers",
        license=license,
        model_name=name,
        pipeline_tag="text-generation",
        # no `trl` tag: solopo's own loop trained it (TRL is a test peer, not a dependency of the training)
        tags=["solopo", algo, f"solopo-{mode}", "long-context"]
        # an adapter-only dir is an adapter of the base (HF's base_model relation); a merged one is a fine-tune
        + (
            ["peft", peft["method"], *([f"base_model:adapter:{base_model}"] if on_hub and adapter_only else [])]
            if peft
            else []
        ),
    )
    setting = {
        "algorithm": algo,
        "mode": mode,
        "alpha (SoLo-RA weight)": result["alpha"],
        "beta": result["beta"],
        **({"orpo_lambda": train_config.get("orpo_lambda")} if algo == "orpo" else {}),
        **({"gamma (SimPO margin)": train_config.get("gamma")} if algo == "simpo" else {}),
        "optimizer steps": result["steps"],
        "training examples": result["examples"],
        "long context length (tokens)": result.get("target_len"),
        "learning rate": train_config.get("lr"),
        "batch (micro x accum x ranks)": f"{train_config.get('micro_batch_size')} x {train_config.get('grad_accum')}"
        f" x {result.get('world_size', 1)}",
        "training dtype": result.get("dtype"),
        "saved dtype": result.get("save_dtype", result.get("dtype")),
    }
    if peft:
        setting.update(
            {
                "fine-tuning": f"{'QLoRA (4-bit NF4 base)' if peft['base_4bit'] else 'LoRA'}, reference = base "
                "with the adapter disabled",
                "LoRA r / alpha / dropout": f"{peft['r']} / {peft['alpha']:g} / {peft['dropout']:g}",
                "LoRA target modules": ", ".join(peft["target_modules"]),
                "trainable parameters": f"{peft['trainable_params']:,} of {peft['all_params']:,}",
                "this directory": "the adapter merged into the base (adapter in `adapter/`)"
                if peft["merged"]
                else "the adapter only (adapter_model.safetensors + adapter_config.json)",
            }
        )
    load = f"""model = AutoModelForCausalLM.from_pretrained("{name}")  # this directory, or its hub id once pushed"""
    if adapter_only:
        load = f"""from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "{name}")  # or .merge_and_unload() for plain weights"""
    final = result.get("final", {})
    body = f"""
# {name}

This model is {f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`"} trained with
[SoLoPO](https://arxiv.org/abs/2505.11166) (Short-to-Long Preference Optimization) by `solopo`:
{algo.upper()} in `{mode}` mode{" with the SoLo-RA reward-alignment term" if mode == "solo" else ""}.

## Training

| setting | value |
|---|---|
{chr(10).join(f"| {k} | {'' if v is None else v} |" for k, v in setting.items())}

Data: {result["examples"]} preference triplets (short prompt, long prompt, chosen, rejected)
{"from " + ", ".join(_dataset_link(d) for d in datasets) if datasets else ""}.
{_chat_section(chat)}
## Final training metrics

{_table([{"metric": k, "value": v} for k, v in final.items()]) if final else "No step was run."}

Per-step logs: `trainer_state.json` (HF Trainer's `log_history`), `logs.jsonl`, `training_curves.png`;
summary: `all_results.json`.

{_EVAL_START}
{_EVAL_END}

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

{load}
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

## Framework versions

- solopo {solopo.__version__}
- Transformers {transformers.__version__}
- PyTorch {torch.__version__}
- huggingface_hub {huggingface_hub.__version__}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = Path(model_dir) / "README.md"
    write_text(str(card), path)
    return path


def add_eval_results(
    model_dir: str | Path,
    rows: list[dict[str, Any]],
    *,
    title: str = "Evaluation",
    notes: str = "",
    tables: list[tuple[str, list[dict[str, Any]]]] = (),
) -> Path:
    """Add (or replace) the evaluation section of model_dir/README.md: a markdown table of `rows` (one dict per
    row; columns in first-seen key order; floats shown with 4 significant digits) under `## {title}`, then each
    of `tables` (subtitle, rows) under its own `### subtitle` (a table of another unit gets its own header row),
    followed by `notes` (units, settings). Idempotent: a second call replaces the first call's section. The card
    must exist (written by the train stage); returns its path."""
    from huggingface_hub import ModelCard

    from solopo.pipeline.errors import SolopoError

    path = Path(model_dir) / "README.md"
    if not path.exists():
        raise SolopoError(f"{path}: no model card to add eval results to (train writes it; rerun `solopo train`)")
    text = path.read_text()
    section = f"{_EVAL_START}\n## {title}\n\n{_table(rows) if rows else 'No evaluation rows.'}\n"
    for subtitle, sub_rows in tables:
        if sub_rows:
            section += f"\n### {subtitle}\n\n{_table(sub_rows)}\n"
    section += (f"\n{notes.strip()}\n" if notes.strip() else "") + _EVAL_END
    pattern = re.compile(re.escape(_EVAL_START) + r".*?" + re.escape(_EVAL_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:  # a card written by something else: append
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    ModelCard(text)  # still a valid card
    write_text(text, path)
    return path
