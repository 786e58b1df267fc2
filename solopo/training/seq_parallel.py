"""Sequence parallelism (train.sp_size > 1) through DeepSpeed's own Ulysses / ALST for Hugging Face models.

Topology: `world` ranks form world / sp_size data-parallel groups of sp_size consecutive ranks (DeepSpeed's
parallel_state_sp). All ranks of one SP group hold the same examples; each runs the decoder over its 1/sp slice
of every sequence. Inside each attention layer ALST's all-to-all trades the sequence split for a head split
(full sequence, heads / sp per rank), so attention is exact. ZeRO-2/3 partitions over all ranks.

Losses: the labels are taken from the full (unsharded) ids, i.e. shifted before sharding; each rank computes the
log-probs of the targets its slice predicts, and the per-sequence sums are all-reduced across the SP group before
any loss (`SeqParallel.sum`), so every SoLoPO loss sees exactly the 1-rank sums. The reduction's backward is the
identity: each rank's gradient is its own share, and DeepSpeed sums over all ranks and divides by the DP degree.

ZeRO-3 is the exception, in DeepSpeed 0.19.8: its reduce-scatter path (stage3.__avg_scatter_grads) averages over
all ranks, not over the DP degree as ZeRO-2 and ZeRO-3's contiguous all-reduce path do, so under ZeRO-3 the
backward multiplies by sp_size (`grad_scale`) and the config pins reduce_scatter=true. tests/test_sp.py compares
ZeRO-3 + SP with one rank, so a DeepSpeed that changes this fails there, not silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from solopo.pipeline.errors import ConfigError, MissingDependencyError

log = logging.getLogger("solopo")


@dataclass(frozen=True)
class SeqParallel:
    """This rank's place in the topology; read by the step (which examples) and the log-prob code (which slice)."""

    size: int = 1  # ranks per SP group (train.sp_size)
    rank: int = 0  # rank within the SP group: which slice of each sequence
    group: Any = None  # the SP process group (None when size == 1)
    dp_rank: int = 0  # which data-parallel group: which examples
    dp_size: int = 1  # world / size
    mpu: Any = None  # DeepSpeed's parallel_state_sp module, for deepspeed.initialize
    grad_scale: float = 1.0  # the sums' backward factor: sp_size under ZeRO-3 (see the module docstring)

    @property
    def on(self) -> bool:
        return self.size > 1

    def bounds(self, s: int) -> tuple[int, int, int]:
        """(padded length, first, end) of this rank's slice of an s-token row: rows are padded to a multiple of
        the SP size (pads after the last real token change nothing under causal attention)."""
        padded = -(-s // self.size) * self.size
        per = padded // self.size
        return padded, self.rank * per, (self.rank + 1) * per

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the SP group; the gradient passes through unchanged (see the module docstring)."""
        return _SumAcrossGroup.apply(t, self.group, self.grad_scale) if self.on else t


class _SumAcrossGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, group, grad_scale: float) -> torch.Tensor:
        import torch.distributed as dist

        ctx.grad_scale = grad_scale
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank computes the same loss from the same sums; rank r's share of d loss/d theta flows back through
        # its own partial sum only. (A sum-all-reduce here would scale the gradient by sp_size.)
        return (grad if ctx.grad_scale == 1.0 else grad * ctx.grad_scale), None, None


# --- validation: before the model is loaded -----------------------------------------------------------------
def valid_sp_sizes(heads: int, kv_heads: int, limit: int | None = None) -> list[int]:
    """SP sizes ALST accepts for a model: they divide the attention heads, and divide the KV heads or are a
    multiple of them (ALST replicates KV heads when sp_size > kv heads, e.g. 4 KV heads at sp 8)."""
    top = heads if limit is None else min(heads, limit)
    return [d for d in range(1, top + 1) if heads % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)]


def check_sp(cfg, model_path: str, world: int) -> None:
    """train.sp_size against the model's heads and the number of ranks; a ConfigError (exit 2) that names the
    valid sizes. Reads only the model's config (no weights)."""
    sp = cfg.sp_size
    if sp == 1:
        return
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(model_path).get_text_config()
    heads = arch.num_attention_heads
    kv = getattr(arch, "num_key_value_heads", None) or heads
    problems = []
    if heads % sp or not (kv % sp == 0 or sp % kv == 0):
        why = (
            f"{heads} attention heads are not divisible by {sp}"
            if heads % sp
            else f"{kv} KV heads: sp_size must divide them or be a multiple of them (ALST then replicates KV heads)"
        )
        problems.append(
            f"train.sp_size={sp} does not fit {model_path} ({heads} attention heads, {kv} KV heads): {why}. "
            f"Valid sp sizes for this model: {', '.join(map(str, valid_sp_sizes(heads, kv)))}"
        )
    if world % sp:
        problems.append(
            f"train.sp_size={sp} needs a number of ranks divisible by it (now {world}): set train.num_processes "
            f"to a multiple of {sp}"
        )
    if problems:
        raise ConfigError(problems)


# --- setup: after the model is loaded, before deepspeed.initialize ---------------------------------------------
def setup_sequence_parallel(
    lm: torch.nn.Module, sp_size: int, rank: int, world: int, zero_stage: int = 2
) -> SeqParallel:
    """Register ALST's Ulysses attention in place of the model's attention implementation and build the SP groups
    (DeepSpeed's mpu). One decoder call per row (micro batch 1 for ALST), any length."""
    if sp_size == 1:
        return SeqParallel(dp_rank=rank, dp_size=world)
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    except ImportError as e:
        raise MissingDependencyError("deepspeed>=0.18.1", "pip install 'deepspeed>=0.18.1'", "train.sp_size > 1") from e
    impl = lm.config._attn_implementation
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=lm,
        core_attn_implementation=impl,
        sequence_parallel_size=sp_size,
        micro_batch_size=1,
        seq_length_is_variable=True,
    )
    return SeqParallel(
        size=sp_size,
        rank=mpu.get_sequence_parallel_rank(),
        group=mpu.get_sequence_parallel_group(),
        dp_rank=rank // sp_size,  # parallel_state_sp groups consecutive ranks
        dp_size=world // sp_size,
        mpu=mpu,
        grad_scale=float(sp_size) if zero_stage == 3 else 1.0,
    )
