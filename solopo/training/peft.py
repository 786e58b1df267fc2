"""LoRA and QLoRA through PEFT (`train.peft=lora|qlora`).

One model in memory: the base weights are frozen and shared by the policy and the reference. The DPO reference
(and the SoLo-RA long reference) is the same model with the adapter disabled (PEFT's `disable_adapter()`, as TRL's
DPOTrainer does when it has no `ref_model`), so it is the base model exactly. The training loop keeps calling the
causal LM that PEFT injected the LoRA layers into (same object, same decoder/LM-head attributes); this module holds
the `PeftModel` wrapper for what needs it: the reference context, adapter names and saving.

Outputs: the adapter as PEFT saves it (`adapter_model.safetensors` + `adapter_config.json`), and with
`train.merge_adapter=true` the adapter merged into the base by PEFT's own `merge_and_unload` (the base reloaded from
disk on rank 0's CPU, so the same code serves ZeRO-3, QLoRA and `solopo eval` on an adapter directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from solopo.pipeline.errors import ConfigError, MissingDependencyError, SolopoError
from solopo.pipeline.io import dir_fingerprint, write_json

log = logging.getLogger("solopo")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_SUBDIR = "adapter"  # where the adapter sits inside a merged model dir
MERGE_RECORD = "solopo_merge.json"  # in a merged dir: which base and adapter it was made from


def _import_peft(what: str):
    try:
        import peft
    except ImportError as e:
        raise MissingDependencyError("peft", 'pip install "solopo[lora]"  (or: pip install "peft>=0.13")', what) from e
    return peft


def load_kwargs(cfg, dtype: torch.dtype) -> dict[str, Any]:
    """Extra `from_pretrained` kwargs for the base: a 4-bit bitsandbytes config for qlora, else none.

    Checked before any weight is loaded: qlora without CUDA or without bitsandbytes is a config error (exit 2),
    never a silent full-precision LoRA run."""
    if cfg.peft == "none":
        return {}
    _import_peft(f"train.peft={cfg.peft}")
    if cfg.peft != "qlora":
        return {}
    if not torch.cuda.is_available():
        raise ConfigError(
            [
                "train.peft=qlora: QLoRA loads the base in 4-bit with bitsandbytes, which needs a CUDA GPU and none "
                "is visible. Use train.peft=lora on this machine (same adapter, full-precision base)"
            ]
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError("bitsandbytes", "pip install bitsandbytes", "train.peft=qlora") from e
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # ZeRO-3 shards parameters of one dtype: PEFT's QLoRA + ZeRO-3 recipe stores the 4-bit blocks as it
            bnb_4bit_quant_storage=dtype,
        )
    }


def lora_config(cfg):
    peft = _import_peft(f"train.peft={cfg.peft}")
    return peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def wrap(lm: torch.nn.Module, cfg, zero3: bool, note) -> Any:
    """Inject the LoRA adapter into `lm` in place and return the PeftModel wrapper (None with train.peft=none).

    As TRL's DPOTrainer: under ZeRO-3 (non-quantized) the adapter keeps the base dtype (mixed bf16/fp32 persistent
    parameters break ZeRO-3's gathers); with gradient checkpointing the input embeddings' output requires grad, so
    that checkpointed blocks over a frozen embedding still backpropagate into the adapters. Unlike TRL, decoder
    checkpointing stays non-reentrant under ZeRO-3: SoLoPO runs two forwards (pair, then x_long) before one
    backward, and reentrant blocks fire each adapter's gradient hook once per forward, which ZeRO-3's reduction
    rejects (duplicate ds_id); non-reentrant ran on ZeRO-3 here (tests/test_lora.py)."""
    if cfg.peft == "none":
        return None
    peft = _import_peft(f"train.peft={cfg.peft}")
    if cfg.peft == "qlora":
        lm = peft.prepare_model_for_kbit_training(
            lm,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    kwargs = {"autocast_adapter_dtype": False} if zero3 and cfg.peft == "lora" else {}
    model = peft.get_peft_model(lm, lora_config(cfg), **kwargs)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.lora.dropout > 0:
        note(f"LoRA dropout {cfg.lora.dropout:g} on the adapter inputs (train.disable_dropout=false): DPO's step-1 "
             "loss is not log 2")  # fmt: skip
    trainable, total = model.get_nb_trainable_parameters()
    targets = target_names(model)
    note(
        f"{cfg.peft}: r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {', '.join(targets)}; trainable parameters "
        f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%); DPO reference = base, adapter disabled"
    )
    return model


def target_names(peft_model) -> list[str]:
    """The adapted module names (q_proj, ...), once each: 'all-linear' expands to every layer's full path."""
    return sorted({t.rsplit(".", 1)[-1] for t in peft_model.peft_config["default"].target_modules})


def reference_context(peft_model):
    """The context in which the policy computes reference log-probs: the adapter disabled (the base model)."""
    return contextlib.nullcontext() if peft_model is None else peft_model.disable_adapter()


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every parameter in full fine-tuning, the adapter's under LoRA."""
    return [p for p in module.parameters() if p.requires_grad]


def describe(peft_model, cfg) -> dict[str, Any] | None:
    """What the model card and the result record about the adapter."""
    if peft_model is None:
        return None
    trainable_n, total = peft_model.get_nb_trainable_parameters()
    return {
        "method": cfg.peft,
        "r": cfg.lora.r,
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
        "target_modules": target_names(peft_model),
        "trainable_params": trainable_n,
        "all_params": total,
        "base_4bit": cfg.peft == "qlora",
        "merged": cfg.merge_adapter,
    }


def adapter_state_dict(peft_model, cfg, rank: int) -> dict[str, torch.Tensor] | None:
    """The adapter's trained weights on rank 0's CPU (None on other ranks), named as in `peft_model`. Under ZeRO-3
    only the adapter parameters are gathered (never the base), collectively on every rank."""
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if cfg.deepspeed == "zero3":
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        if rank != 0:
            return None
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_adapter(peft_model, state_dict: dict[str, torch.Tensor], out: Path, dtype: torch.dtype) -> None:
    """adapter_model.safetensors + adapter_config.json, as PEFT writes them (PeftModel.from_pretrained loads it)."""
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    peft_model.save_pretrained(str(out), state_dict=sd, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's stub card; the model dir's README.md describes the run


def merge(base_path: str, adapter_dir: Path, out: Path, dtype: torch.dtype | str, tokenizer=None) -> None:
    """Save base + adapter merged (PEFT's merge_and_unload) as a plain HF checkpoint at `out`. The base is loaded
    in `dtype` ("auto": as stored) on the CPU: for QLoRA this is the full-precision base, not the 4-bit one the
    adapter was trained against."""
    peft = _import_peft("merging a LoRA adapter")
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_ds

    # Whole weights on this process's CPU, also inside a ZeRO-3 run (whose HfDeepSpeedConfig would partition them).
    saved, hf_ds._hf_deepspeed_config_weak_ref = hf_ds._hf_deepspeed_config_weak_ref, None
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    write_json(
        {"base_model": base_path, "adapter": str(adapter_dir), "dtype": str(dtype).removeprefix("torch.")},
        out / MERGE_RECORD,
    )


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory with no model weights of its own (what train.merge_adapter=false leaves)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on (adapter_config.json's base_model_name_or_path)."""
    f = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        base = json.loads(f.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise SolopoError(f"{f}: unreadable adapter config ({e}); retrain or restore the file") from e
    if not base:
        raise SolopoError(f"{f}: no base_model_name_or_path; set it to the base model's path or hub id")
    return base


def merged_for_eval(adapter_dir: str | Path, cache: Path, note) -> tuple[str, dict[str, Any]]:
    """An adapter dir -> a merged checkpoint to generate with (cached under `cache`, keyed by the adapter's bytes
    and the base), and what was done, for the report."""
    adapter_dir = Path(adapter_dir)
    base = adapter_base(adapter_dir)
    from solopo.models import resolve_model

    base_path = resolve_model(base)
    key = dir_fingerprint(adapter_dir)["sha256"][:16]
    out = cache / f"{adapter_dir.name}-{key}"
    if not (out / MERGE_RECORD).is_file():
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        from transformers import AutoTokenizer

        tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
        merge(base_path, adapter_dir, tmp, "auto", AutoTokenizer.from_pretrained(tok_src))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    note(f"{adapter_dir} is a LoRA adapter: evaluated merged into its base {base} (PEFT merge_and_unload) at {out}")
    info = {"adapter": str(adapter_dir), "base_model": base, "merged_to": str(out), "how": "peft merge_and_unload"}
    return str(out), info
