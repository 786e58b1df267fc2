"""Settings resolved from `train.*` and the machine: loss parameters, attention, dtype, DeepSpeed config."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from solopo.pipeline.errors import SolopoError
from solopo.resources import resource_text
from solopo.training.losses import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    LossParams,
)

log = logging.getLogger("solopo")


class TrainingError(SolopoError):
    """Training stopped for a reason the user can act on (non-finite loss, out of memory)."""


# --- settings resolved from the config ------------------------------------------------------------------
def resolve_params(cfg) -> LossParams:
    alpha = DEFAULT_ALPHA[cfg.algo] if cfg.alpha is None else cfg.alpha
    if cfg.mode != "solo":
        alpha = 0.0  # short/long/expand-long are plain PO baselines
    beta = DEFAULT_BETA[cfg.algo] if cfg.beta is None else cfg.beta
    return LossParams(alpha=alpha, beta=beta, gamma=cfg.gamma, orpo_lambda=cfg.orpo_lambda)


def pick_attn(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def pick_dtype(requested: str) -> torch.dtype:
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp32":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def build_ds_config(cfg, dtype: torch.dtype, world_size: int) -> dict[str, Any]:
    """The shipped ZeRO config with the 'auto' values filled from the train config."""
    ds = json.loads(resource_text("training", "ds_configs", f"{cfg.deepspeed}.json"))
    if cfg.offload != "none":
        extra = json.loads(resource_text("training", "ds_configs", f"offload_{cfg.offload}.json"))
        ds["zero_optimization"].update(extra["zero_optimization"])
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    # DeepSpeed's batch is per DP group: the ranks of one SP group share their examples. ZeRO-3's zero.Init (from
    # HfDeepSpeedConfig, before the mpu exists) reads the SP size from the config.
    ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum * (world_size // cfg.sp_size)
    if cfg.sp_size > 1:
        ds["sequence_parallel_size"] = cfg.sp_size
        if cfg.deepspeed == "zero3":  # the path whose averaging SeqParallel.grad_scale compensates
            ds["zero_optimization"]["reduce_scatter"] = True
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    return ds


def count_parameters(model_path: str, trust_remote_code: bool = False) -> int:
    """Parameters of the model at `model_path`, from its config on the meta device (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trc = {"trust_remote_code": trust_remote_code}
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path, **trc), **trc)
    return sum(p.numel() for p in m.parameters())


def resolve_deepspeed(
    cfg, model_path: str, world: int, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[str, str]:
    """train.deepspeed=auto -> (none | zero3, why). ZeRO-3 on one GPU only costs time (parameter hooks, gathers
    per layer), so it is chosen when the plain model + grads + AdamW state would not leave half the GPU for
    activations, or when there are several ranks (to shard those states). On CPU: plain torch (what works)."""
    if cfg.deepspeed != "auto":
        return cfg.deepspeed, ""
    if cfg.offload != "none":
        return "zero3", f"train.offload={cfg.offload} needs ZeRO"
    if cfg.sp_size > 1 and not torch.cuda.is_available():
        return "zero2", f"train.sp_size={cfg.sp_size} runs through DeepSpeed (ALST); CPU: ZeRO-2"
    if not torch.cuda.is_available():
        return "none", "CPU: plain torch"
    if world > 1:
        return "zero3", f"{world} ranks: ZeRO-3 shards weights, grads and optimizer state"
    n = count_parameters(model_path, trust_remote_code)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    need = n * itemsize * 4  # weights, grads, AdamW exp_avg and exp_avg_sq (torch keeps them in the param dtype)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    verdict = "zero3" if need > 0.5 * total else "none"
    return verdict, (
        f"{n / 1e9:.2f}B parameters need {need / 2**30:.1f} GiB for weights+grads+AdamW in {dtype}; the GPU has "
        f"{total / 2**30:.0f} GiB: {'over' if verdict == 'zero3' else 'within'} half of it"
    )
