"""One optimizer step: micro-batch log-probs, the objective, backward, and the per-step numerical health check.

The hot path: no host sync per micro-batch; metrics stay on the device until the step is done."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from solopo.training.data import (
    Example,
    collate,
    collate_shared,
)
from solopo.training.logprobs import Targets, targets_from_masks
from solopo.training.losses import (
    Batch,
    LossOutput,
    LossParams,
    SeqLogps,
)

from .distributed import all_reduce, peak_memory_gb
from .settings import TrainingError

log = logging.getLogger("solopo")


# --- one micro-batch ---------------------------------------------------------------------------------------
@dataclass
class MicroOut:
    out: LossOutput
    tokens: int


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host: pinned memory and an async copy on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _targets_to(t: Targets, device: torch.device) -> Targets:
    return Targets(*(_to(x, device) for x in t))


def micro_batch_logps(
    forward,
    examples: list[Example],
    pad_id: int,
    with_long: bool,
    orpo_sequence_nll: bool,
    device: torch.device,
    shared_prefix: bool = False,
) -> tuple[Batch, int]:
    """Two forwards: the PO pair and the RA sequences. The pair is either a padded batch of 2b rows (chosen, then
    rejected) or, with `shared_prefix`, b packed rows [prompt, chosen, rejected] (the prompt computed once).
    Returns the log-probs and the tokens processed. Collation and target indexing run on the host (token ids
    are cached per sequence); nothing here waits for the device."""
    b = len(examples)
    dev = device
    if shared_prefix:
        with record_function("solopo.collate"):
            sp = collate_shared(examples, pad_id, full_mask=orpo_sequence_nll)
            args = (_to(sp.input_ids, dev), _targets_to(targets_from_masks(sp.masks, sp.pred_index), dev))
            pos = _to(sp.position_ids, dev)
        # the pattern is in `segments` (no (b, 1, s, s) mask unless the attention is eager)
        outs = forward(args[0], None, args[1], pos, None, sp.segments)
        chosen, rejected = outs[0], outs[1]  # (b,) each
        nll_w = outs[2] if orpo_sequence_nll else None
        tokens = sum(len(e.chosen) + len(e.rejected.completion) for e in examples)
    else:
        pair = [e.chosen for e in examples] + [e.rejected for e in examples]
        with record_function("solopo.collate"):
            ids, _, masks = collate(pair, pad_id, full_mask=orpo_sequence_nll)
            ids, tg = _to(ids, dev), _targets_to(targets_from_masks(masks), dev)
        # Right padding under causal attention: no real token can see the pads after it, so the padding mask is
        # dropped (transformers would expand it to a dense (2b, 1, s, s) mask; without it sdpa runs is_causal).
        outs = forward(ids, None, tg)
        comp = outs[0]
        chosen = SeqLogps(comp.total[:b], comp.count[:b])  # (b,)
        rejected = SeqLogps(comp.total[b:], comp.count[b:])  # (b,)
        nll_w = SeqLogps(outs[1].total[:b], outs[1].count[:b]) if orpo_sequence_nll else None
        tokens = sum(len(s) for s in pair)
    long_w = None
    if with_long:
        longs = [e.long_w for e in examples]
        with record_function("solopo.collate"):
            ids, _, masks = collate(longs, pad_id)
            ids, tg = _to(ids, dev), _targets_to(targets_from_masks(masks), dev)
        long_w = forward(ids, None, tg)[0]
        tokens += sum(len(s) for s in longs)
    return Batch(chosen=chosen, rejected=rejected, long_w=long_w, nll_w=nll_w), tokens


# --- numerical health: one device-side reduction per optimizer step ----------------------------------------------
def step_health(
    grad_norm: torch.Tensor | float | None,
    params: list[torch.Tensor],
    losses: list[torch.Tensor],
    device: torch.device,
) -> tuple[float | None, list[str]]:
    """After an optimizer step: (grad norm, what is non-finite among "gradients", "parameters", "loss").

    The gradients are judged by their global norm, the updated parameters by max |p| (NaN propagates, inf stays
    inf, and unlike a 2-norm no finite value overflows), the loss by the step's per-example losses (b,) each.
    Everything is reduced on the device and crosses to the host once per step (never per micro-batch); the flags
    are max-reduced across ranks so that every rank takes the same branch."""
    on = device if device.type == "cuda" else torch.device("cpu")  # nccl reduces CUDA tensors, gloo CPU ones
    gn = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=on).float().reshape(())
    params = [t for t in params if t.numel() > 0]  # a ZeRO-3 partition can be empty
    pmax = (
        torch.stack([n.to(on).float() for n in torch._foreach_norm(params, float("inf"))]).max()
        if params
        else torch.zeros((), device=on)
    )
    loss_ok = torch.isfinite(torch.cat(losses).float()).all() if losses else torch.ones((), device=on, dtype=torch.bool)
    bad = torch.stack([~torch.isfinite(gn), ~torch.isfinite(pmax), ~loss_ok.to(on)]).float()  # (3,)
    vals = torch.cat([gn.reshape(1), all_reduce(bad, "max")]).tolist()  # the one host sync of the check
    names = [k for k, flag in zip(("gradients", "parameters", "loss"), vals[1:], strict=True) if flag]
    return (None if grad_norm is None else vals[0]), names


def nonfinite_error(what: list[str], step: int, ids: list[str], losses: list[torch.Tensor], cfg, rank: int):
    """The error for a step that went non-finite (rare path: host syncs are fine here)."""
    finite = torch.isfinite(torch.cat(losses).float()).cpu().tolist() if losses else []
    bad_loss = [i for i, ok in zip(ids, finite, strict=False) if not ok]
    where = f" on rank {rank}" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    return TrainingError(
        f"non-finite {' and '.join(what)} at optimizer step {step}{where}, examples {ids}"
        + (f" (non-finite loss for {bad_loss})" if bad_loss else "")
        + f". No checkpoint or model was written from it. Lower train.lr (now {cfg.lr:g}) or train.max_grad_norm "
        f"(now {cfg.max_grad_norm:g}), use train.dtype=fp32, or check these examples"
    )


def check_state_finite(state_dict: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Before the model is written: every floating tensor finite (rank 0 holds the gathered weights; all ranks
    raise together)."""
    bad = [k for k, v in (state_dict or {}).items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    on = device if device.type == "cuda" else torch.device("cpu")
    if all_reduce(torch.tensor([float(bool(bad))], device=on), "max").item():
        raise TrainingError(
            f"the trained weights hold non-finite values ({len(bad)} tensors, e.g. {bad[:3]}): the model was not "
            "saved. Lower train.lr or train.max_grad_norm, or use train.dtype=fp32"
        )


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout off everywhere (TRL's disable_dropout=True): the DPO reference log-probs are computed in eval mode,
    so a policy with dropout would not equal its reference at step 1. TRL zeroes nn.Dropout modules; HF attention
    dropout is a float attribute read in forward (LlamaAttention.attention_dropout), so zero those too.
    Returns how many were on."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout) and mod.p > 0:
            mod.p, n = 0.0, n + 1
        for name, v in list(vars(mod).items()):
            if "dropout" in name and isinstance(v, float) and v > 0:
                setattr(mod, name, 0.0)
                n += 1
    return n


def train_step(
    backend,
    objective,
    params: LossParams,
    examples: list[Example],
    cfg,
    pad_id: int,
    with_long: bool,
    device: torch.device,
    ref: dict[str, dict[str, float]] | None = None,
) -> _Agg:
    """One optimizer step over this rank's `examples` (micro_batch_size x grad_accum of them), as micro-batches.
    The hot path: host-side collation, no host sync per micro-batch (metrics and per-example losses stay on the
    device; the caller's step_health reads them once per step). Ranges are labelled for torch.profiler (bench/train)."""
    agg = _Agg(device)
    per_step = cfg.micro_batch_size * cfg.grad_accum
    for m in range(cfg.grad_accum):
        chunk = examples[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]
        with record_function("solopo.forward"):  # collation inside: labelled solopo.collate by micro_batch_logps
            batch, tokens = micro_batch_logps(
                backend.forward, chunk, pad_id, with_long, cfg.orpo_nll == "sequence", device, cfg.shared_prefix
            )
            if ref is not None:
                _attach_ref(batch, chunk, ref, cfg.ra_ref, device)
            out = objective(batch, params)
            loss = out.loss.sum() / per_step  # (b,) -> scalar; exact mean over the step's examples
        agg.ids += [e.id for e in chunk]
        agg.losses.append(out.loss.detach())  # (b,): judged once after the step by step_health
        boundary = m == cfg.grad_accum - 1
        with record_function("solopo.backward"):
            backend.backward(loss)
        with record_function("solopo.optimizer" if boundary else "solopo.micro_done"):
            backend.micro_done(boundary=boundary)
        agg.add(out, tokens)
    return agg


class _Agg:
    """Sums per-example values over a step's micro-batches on the device (no host sync per micro-batch), then
    reduces across ranks and reads them once per step."""

    KEYS = ("loss", "po_loss", "ra_loss", "reward_chosen", "reward_rejected", "reward_acc", "ra_distance")

    def __init__(self, device: torch.device | None = None):
        self.device = device if device is not None and device.type == "cuda" else torch.device("cpu")
        self.sums = torch.zeros(len(self.KEYS) + 1, dtype=torch.float64, device=self.device)  # + examples
        self.tokens = 0  # known on the host
        self.ids: list[str] = []  # the step's example ids, in order
        self.losses: list[torch.Tensor] = []  # (b,) per micro-batch, on the device

    def add(self, out: LossOutput, tokens: int) -> None:
        vals = [
            out.loss.detach(),
            out.po_loss,
            out.ra_loss,
            out.reward_chosen,
            out.reward_rejected,
            (out.reward_chosen > out.reward_rejected).float(),
            out.ra_distance,
        ]
        sums = torch.stack([v.detach().to(torch.float64).sum() for v in vals])  # (7,) on the loss's device
        self.sums[:-1] += sums.to(self.device)
        self.sums[-1] += out.loss.shape[0]
        self.tokens += tokens

    def finish(self, seconds: float, device: torch.device, sp_size: int = 1) -> dict[str, float]:
        """Means over the step's examples on all ranks. The ranks of one SP group hold the same examples: their
        copies cancel in the means; the tokens are divided by sp_size."""
        tok = torch.tensor([self.tokens], dtype=torch.float64, device=self.device)
        s = all_reduce(torch.cat([self.sums, tok])).cpu()
        s[-1] /= sp_size
        mem = all_reduce(
            torch.tensor([peak_memory_gb(device)], device=device if device.type == "cuda" else "cpu"), "max"
        )
        n = max(1.0, float(s[-2]))
        row = {k: float(s[i]) / n for i, k in enumerate(self.KEYS)}
        row.update(
            tokens=int(s[-1]),
            step_seconds=seconds,
            tokens_per_s=float(s[-1]) / max(seconds, 1e-9),
            peak_mem_gb=float(mem.item()),
        )
        return row


def _attach_ref(batch: Batch, chunk: list[Example], ref: dict[str, dict[str, float]], ra_ref: str, device) -> None:
    def col(name: str) -> torch.Tensor:
        return torch.tensor([ref[e.id][name] for e in chunk], dtype=torch.float32, device=device)

    batch.ref_chosen, batch.ref_rejected = col("ref_chosen"), col("ref_rejected")
    if batch.long_w is not None:
        # ra_ref=short reuses pi_ref(y_w | x_short) as the long reward's reference (LongPO-style).
        batch.ref_long_w = col("ref_long_w") if ra_ref == "long" else batch.ref_chosen
