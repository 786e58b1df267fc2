"""The SoLoPO training loop (reads top to bottom, nanoGPT style).

setup: distributed env -> dtype/attention -> DeepSpeed config -> model -> tokenized examples
       -> DPO reference log-probs (once, cached) -> optimizer/scheduler -> backend -> resume
loop:  for each optimizer step, for each micro-batch:
           short+chosen & short+rejected in one padded forward   (PO pair; x_long in long modes)
           long+chosen in a second forward                       (SoLo-RA, solo mode only)
           loss = sum(per-example loss) / examples in the step    (exact gradient accumulation)
       step, log, checkpoint
end:   save the model in HF format (loads with AutoModelForCausalLM)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch.profiler import record_function

from solopo.pipeline.errors import MissingDependencyError, SolopoError
from solopo.pipeline.io import read_parquet, stable_hash, write_json, write_parquet, write_text
from solopo.resources import resource_text
from solopo.training.data import (
    Example,
    build_examples,
    collate,
    collate_shared,
    length_grouped_batches,
    select_target_len,
)
from solopo.training.logprobs import CompletionLogps, Targets, targets_from_masks, use_segment_attention
from solopo.training.losses import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    OBJECTIVES,
    Batch,
    LossOutput,
    LossParams,
    SeqLogps,
)
from solopo.training.model_card import hf_trainer_files

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
    ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum * world_size
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    return ds


def count_parameters(model_path: str) -> int:
    """Parameters of the model at `model_path`, from its config on the meta device (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in m.parameters())


def resolve_deepspeed(cfg, model_path: str, world: int, dtype: torch.dtype) -> tuple[str, str]:
    """train.deepspeed=auto -> (none | zero3, why). ZeRO-3 on one GPU only costs time (parameter hooks, gathers
    per layer), so it is chosen when the plain model + grads + AdamW state would not leave half the GPU for
    activations, or when there are several ranks (to shard those states). On CPU: plain torch (what works)."""
    if cfg.deepspeed != "auto":
        return cfg.deepspeed, ""
    if cfg.offload != "none":
        return "zero3", f"train.offload={cfg.offload} needs ZeRO"
    if not torch.cuda.is_available():
        return "none", "CPU: plain torch"
    if world > 1:
        return "zero3", f"{world} ranks: ZeRO-3 shards weights, grads and optimizer state"
    n = count_parameters(model_path)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    need = n * itemsize * 4  # weights, grads, AdamW exp_avg and exp_avg_sq (torch keeps them in the param dtype)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    verdict = "zero3" if need > 0.5 * total else "none"
    return verdict, (
        f"{n / 1e9:.2f}B parameters need {need / 2**30:.1f} GiB for weights+grads+AdamW in {dtype}; the GPU has "
        f"{total / 2**30:.0f} GiB: {'over' if verdict == 'zero3' else 'within'} half of it"
    )


# --- distributed ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_deepspeed: bool) -> tuple[int, int, int]:
    """(rank, local_rank, world). One plain process without launcher env: sets a 1-rank env for DeepSpeed."""
    if use_deepspeed and "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 or use_deepspeed:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if use_deepspeed:
                import deepspeed

                deepspeed.init_distributed(dist_backend=backend)
            else:
                dist.init_process_group(backend=backend)
    return rank, local_rank, world


def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# --- backends: plain torch or DeepSpeed, one small interface --------------------------------------------------
class PlainBackend:
    def __init__(self, module, optimizer, scheduler, cfg):
        self.module, self.optimizer, self.scheduler, self.cfg = module, optimizer, scheduler, cfg
        self.grad_norm: torch.Tensor | float = 0.0  # of the last step; a device tensor until the step's check

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_done(self, boundary: bool) -> None:
        if not boundary:
            return
        _average_grads_across_ranks(self.module)
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def local_params(self) -> list[torch.Tensor]:
        """The parameter values this rank holds (all of them without ZeRO-3)."""
        return [p.detach() for p in self.module.parameters()]

    def save_checkpoint(self, path: Path, state: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(
            {
                "model": self.module.lm.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **state,
            },
            tmp / "state.pt",
        )
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def load_checkpoint(self, path: Path) -> dict:
        # Plain tensors, numbers and strings only: no pickled code runs when a checkpoint is read.
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        self.module.lm.load_state_dict(blob.pop("model"))
        self.optimizer.load_state_dict(blob.pop("optimizer"))
        self.scheduler.load_state_dict(blob.pop("scheduler"))
        return blob

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.module.lm.state_dict()


def _average_grads_across_ranks(module: torch.nn.Module) -> None:
    """Without DeepSpeed, several ranks (accelerate launch) are plain data parallel: each rank's loss is the mean
    over its own examples, so the global mean gradient is the rank average. One flat all-reduce per step (no
    overlap with backward: DeepSpeed is the fast path); a missing grad counts as zeros so all ranks reduce the
    same buffer."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


class DeepSpeedBackend(PlainBackend):
    def __init__(self, engine, cfg):
        self.engine, self.cfg = engine, cfg
        self.module = engine.module
        self.grad_norm = 0.0

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the examples of the whole step: no extra 1/grad_accum.
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_done(self, boundary: bool) -> None:
        self.engine.step()  # DeepSpeed counts micro-batches and updates at the accumulation boundary
        if boundary:
            gn = self.engine.get_global_grad_norm()
            self.grad_norm = gn  # None when DeepSpeed did not compute one: the weights' check still runs

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def local_params(self) -> list[torch.Tensor]:
        # ZeRO-3 keeps only this rank's partition of each parameter in `ds_tensor`.
        return [getattr(p, "ds_tensor", p).detach() for p in self.module.parameters()]

    def save_checkpoint(self, path: Path, state: dict) -> None:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state=state)

    def load_checkpoint(self, path: Path) -> dict:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        return client or {}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.deepspeed == "zero3":
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # every rank must call; rank 0 gets it
            return None if sd is None else {k.removeprefix("lm."): v for k, v in sd.items()}
        return self.module.lm.state_dict()


def make_scheduler(optimizer, cfg, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    vals = torch.cat([gn.reshape(1), _all_reduce(bad, "max")]).tolist()  # the one host sync of the check
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
    if _all_reduce(torch.tensor([float(bool(bad))], device=on), "max").item():
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


# --- DPO reference log-probs: computed once before training, cached with the data ---------------------------------
REF_COLUMNS = ("ref_chosen", "ref_rejected", "ref_long_w")


@torch.no_grad()
def compute_ref_logps(
    forward,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    desc: str,
    device: torch.device,
    with_long: bool,
    shared_prefix: bool = False,
) -> dict[str, list]:
    from tqdm import tqdm

    out = {"id": [], "ref_chosen": [], "ref_rejected": [], "ref_long_w": []}
    rank0 = int(os.environ.get("RANK", 0)) == 0
    for s in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not rank0):
        chunk = examples[s : s + batch_size]
        batch, _ = micro_batch_logps(forward, chunk, pad_id, with_long, False, device, shared_prefix)
        out["id"] += [e.id for e in chunk]
        out["ref_chosen"] += batch.chosen.total.float().cpu().tolist()
        out["ref_rejected"] += batch.rejected.total.float().cpu().tolist()
        out["ref_long_w"] += (
            batch.long_w.total.float().cpu().tolist() if batch.long_w is not None else [None] * len(chunk)
        )
    return out


def _examples_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        for s in (e.chosen, e.rejected, e.long_w):
            if s is not None:
                h.update(json.dumps([s.prompt, s.completion]).encode())
    return h.hexdigest()


# --- the whole run ------------------------------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def train(
    cfg,
    model_path: str,
    table: pa.Table | None = None,
    data_path: str | None = None,
    out_dir: str | Path = "runs/train",
    seed: int = 0,
    source: str = "export/data.parquet",
    ctx=None,
) -> dict[str, Any]:
    """Train one model; returns the result (model path, steps, final metrics). Runs on every rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    notes: list[str] = []
    drops_out: dict[str, list[str]] = {}

    def note(msg: str) -> None:
        if ctx is not None:
            ctx.note(msg)
        elif rank == 0:
            log.warning("[train] %s", msg)
        notes.append(msg)

    # -- distributed env, dtype, attention
    ds_choice, ds_why = resolve_deepspeed(cfg, model_path, int(os.environ.get("WORLD_SIZE", 1)), pick_dtype(cfg.dtype))
    if cfg.deepspeed == "auto":
        cfg = cfg.model_copy(update={"deepspeed": ds_choice})
        notes.append(f"train.deepspeed=auto -> {ds_choice} ({ds_why})")  # a choice, recorded (rank not known yet)
        if ctx is not None:
            ctx.note(notes[-1])
    use_ds = cfg.deepspeed != "none"
    rank, local_rank, world = init_distributed(use_ds)
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = pick_dtype(cfg.dtype)
    attn = pick_attn(cfg.attn)
    if cfg.shared_prefix and attn == "flash_attention_2":
        attn = "sdpa"
        note("shared_prefix packs chosen and rejected with a custom attention mask: using sdpa, not flash-attn")
    if cfg.attn == "auto" and torch.cuda.is_available() and attn == "sdpa" and not cfg.shared_prefix:
        note("flash-attn is not installed: using sdpa attention (pip install flash-attn for the varlen kernels)")
    params = resolve_params(cfg)
    random.seed(seed)
    torch.manual_seed(seed)
    if rank == 0:
        log.info(
            "[train] %s-%s alpha=%g beta=%g on %s x%d, dtype %s, attention %s, deepspeed %s%s",
            cfg.algo,
            cfg.mode,
            params.alpha,
            params.beta,
            device.type,
            world,
            dtype,
            attn,
            cfg.deepspeed,
            ", shared prefix (prompt computed once per pair)" if cfg.shared_prefix else "",
        )

    # -- DeepSpeed config (HfDeepSpeedConfig must exist before from_pretrained for ZeRO-3 partitioned loading)
    ds_config = build_ds_config(cfg, dtype, world) if use_ds else None
    _keep_alive = None
    if use_ds and cfg.deepspeed == "zero3":
        from transformers.integrations import HfDeepSpeedConfig

        _keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers reads it through a weakref)

    # -- model and tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
    lm.config.use_cache = False
    if cfg.disable_dropout:
        if disable_dropout(lm):
            note("dropout disabled in the policy (train.disable_dropout=true, as TRL)")
    elif any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm.modules()) or any(
        v > 0 for k, v in lm.config.to_dict().items() if "dropout" in k and isinstance(v, float)
    ):
        note("dropout stays on in the policy (train.disable_dropout=false): DPO's step-1 loss is not log 2")
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.shared_prefix and not use_segment_attention(lm):
        note(f"shared_prefix with {attn} attention builds a dense (b, 1, s, s) mask (O(s^2)); sdpa avoids it")
    # ZeRO-3 gathers the LM head's weights at every chunk call: ranks must agree on the chunk count.
    module = CompletionLogps(lm, chunk_size=cfg.logps_chunk, sync_chunks=cfg.deepspeed == "zero3" and world > 1)
    if not use_ds:
        module.to(device)

    # -- data
    if table is None:
        if data_path is None:
            raise SolopoError("train() needs a table or a data_path")
        table = read_parquet(data_path)
    table, target_len = select_target_len(table, cfg.target_len, source)
    # The (x_long, y_w) forward only exists for SoLo-RA; solo with alpha=0 is the short-only baseline.
    with_long = cfg.mode == "solo" and params.alpha > 0
    examples, drops = build_examples(table, tokenizer, cfg.mode, with_long, source, cfg.max_length)
    for reason, ids in drops.items():
        drops_out[reason] = ids
        if ctx is not None:
            for i in ids:
                ctx.drop(reason, example=i)
        if rank == 0:
            log.warning("[train] dropped %d example(s): %s (e.g. %s)", len(ids), reason, ids[:3])
    if not examples:
        raise SolopoError(f"no training examples left from {source} (drops: { {k: len(v) for k, v in drops.items()} })")

    # -- optimizer, steps
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = max(1, math.ceil(len(examples) / global_batch))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if use_ds and cfg.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    if use_ds:
        try:
            import deepspeed
        except ImportError as e:
            raise MissingDependencyError(
                "deepspeed", "pip install deepspeed", f"train.deepspeed={cfg.deepspeed}"
            ) from e
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        backend: PlainBackend = DeepSpeedBackend(engine, cfg)
        device = engine.device if hasattr(engine, "device") else device
    else:
        backend = PlainBackend(module, optimizer, scheduler, cfg)
    forward = backend.forward

    # -- model dir, checkpoints
    out_dir = Path(out_dir)
    model_dir = out_dir / "models" / f"{cfg.algo}-{cfg.mode}"
    ckpt_dir = model_dir.with_name(model_dir.name + ".checkpoints")
    run_key = stable_hash(
        {
            "cfg": cfg.model_dump(mode="json"),
            "model": model_path,
            "seed": seed,
            "world": world,
            "data": _examples_digest(examples),
        }
    )

    # -- DPO reference log-probs, once, with the initial weights (= the reference); cached with the data
    ref = None
    if cfg.algo == "dpo":
        ref = _reference_logps(forward, module, examples, pad_id, cfg, out_dir, model_path, rank, world, note, device)

    # -- resume
    state = RunState()
    if cfg.resume and cfg.save_steps > 0:
        latest = _latest_checkpoint(ckpt_dir, run_key)
        if latest is not None:
            client = backend.load_checkpoint(latest)
            state.step = int(client.get("step", 0))
            state.history = list(client.get("history", []))
            note(f"resumed from checkpoint {latest} at step {state.step}")
        elif ckpt_dir.exists() and any(ckpt_dir.glob("step-*")):
            note(f"checkpoints in {ckpt_dir} belong to another config/data; starting from step 0")
            if rank == 0:
                shutil.rmtree(ckpt_dir, ignore_errors=True)

    if rank == 0:
        # A fresh run starts a fresh log; a resumed one continues the checkpoint's (rows after it are redone).
        logged = [r for r in state.history if r["step"] % cfg.logging_steps == 0]
        write_text("".join(json.dumps(r) + "\n" for r in logged), model_dir / "logs.jsonl")

    # -- loop
    objective = OBJECTIVES[cfg.algo]
    writer = _make_writer(cfg, model_dir, rank)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=state.step, desc=f"train {cfg.algo}-{cfg.mode}", disable=rank != 0)
    lengths = [e.tokens for e in examples]
    per_step = cfg.micro_batch_size * cfg.grad_accum
    module.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_loop, start_step = time.time(), state.step
    try:
        while state.step < total_steps:
            epoch, in_epoch = divmod(state.step, steps_per_epoch)
            # Global batches of this epoch; this rank takes its slice of each.
            batches = length_grouped_batches(lengths, global_batch, seed, epoch)
            step_idx = batches[in_epoch][rank * per_step : (rank + 1) * per_step]
            t0 = time.time()
            agg = train_step(
                backend,
                objective,
                params,
                [examples[i] for i in step_idx],
                cfg,
                pad_id,
                with_long,
                device,
                ref,
            )
            step_ids, step_losses = agg.ids, agg.losses
            state.step += 1
            # Gradients, updated weights and losses finite, or stop here: no checkpoint, no model, no _SUCCESS.
            grad_norm, nonfinite = step_health(backend.grad_norm, backend.local_params(), step_losses, device)
            if nonfinite:
                raise nonfinite_error(nonfinite, state.step, step_ids, step_losses, cfg, rank)
            row = agg.finish(time.time() - t0, device, world)
            row.update(step=state.step, epoch=epoch, lr=backend.lr(), grad_norm=grad_norm)
            state.history.append(row)
            if rank == 0 and (state.step % cfg.logging_steps == 0 or state.step == total_steps):
                _log_row(row, model_dir, writer)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}", acc=f"{row['reward_acc']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}"
                )
            bar.update(1)
            if cfg.save_steps > 0 and state.step % cfg.save_steps == 0 and state.step < total_steps:
                backend.save_checkpoint(
                    ckpt_dir / f"step-{state.step}", {"step": state.step, "history": state.history, "run_key": run_key}
                )
                if rank == 0:
                    write_json(
                        {"run_key": run_key, "step": state.step}, ckpt_dir / f"step-{state.step}" / "solopo.json"
                    )
    except torch.OutOfMemoryError as e:
        raise TrainingError(
            f"out of memory at step {state.step + 1} ({e.__class__.__name__}). Options that help: train on a shorter "
            "long context (train.target_len or synth.target_len), train.micro_batch_size=1 with a larger "
            "train.grad_accum, train.gradient_checkpointing=true, train.deepspeed=zero3 with train.offload=optimizer "
            "or full, a smaller train.logps_chunk, or more GPUs (train.num_processes)"
        ) from None
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    # -- save the final model in HF format, in the training dtype unless train.save_dtype=fp32
    loop_seconds = time.time() - t_loop
    sd = backend.full_state_dict()
    check_state_finite(sd if rank == 0 else None, device)
    if rank == 0:
        save_dtype = torch.float32 if cfg.save_dtype == "fp32" else dtype
        hf_files = hf_trainer_files(
            state.history[start_step:],
            state.history,
            cfg,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            examples=len(examples),
            seconds=loop_seconds,
            n_params=sum(getattr(p, "ds_numel", p.numel()) for n, p in lm.named_parameters() if "embed" not in n),
            world=world,
        )
        _save_model(lm, tokenizer, sd, model_dir, save_dtype, hf_files)
        if cfg.save_steps > 0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        _plot(state.history, model_dir / "training_curves.png", f"{cfg.algo}-{cfg.mode}")
        write_parquet(
            pa.Table.from_pylist(state.history) if state.history else pa.table({}), model_dir / "history.parquet"
        )
    _barrier()
    last = state.history[-1] if state.history else {}
    tail = state.history[-max(1, min(len(state.history), 5)) :]
    final = {
        k: last[k]
        for k in (
            "loss",
            "po_loss",
            "ra_loss",
            "reward_chosen",
            "reward_rejected",
            "reward_acc",
            "ra_distance",
            "tokens_per_s",
            "peak_mem_gb",
        )
        if k in last
    }
    if tail:
        final["loss_last5_mean"] = sum(r["loss"] for r in tail) / len(tail)
    return {
        "model_path": str(model_dir.resolve()),
        "algo": cfg.algo,
        "mode": cfg.mode,
        "alpha": params.alpha,
        "beta": params.beta,
        "steps": state.step,
        "examples": len(examples),
        "target_len": target_len,
        "final": final,
        "seconds": round(time.time() - t_start, 2),
        "tokens_per_s": last.get("tokens_per_s"),
        "peak_mem_gb": max((r["peak_mem_gb"] for r in state.history), default=None),
        "world_size": world,
        "attn": attn,
        "dtype": str(dtype).removeprefix("torch."),
        "save_dtype": "float32" if cfg.save_dtype == "fp32" else str(dtype).removeprefix("torch."),
        "deepspeed": cfg.deepspeed,
        "notes": notes,
        "drops": drops_out,
    }


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

    def finish(self, seconds: float, device: torch.device, world: int) -> dict[str, float]:
        tok = torch.tensor([self.tokens], dtype=torch.float64, device=self.device)
        s = _all_reduce(torch.cat([self.sums, tok])).cpu()
        mem = _all_reduce(
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


def rank_shard(n: int, rank: int, world: int) -> list[int]:
    """Indices rank..n step world, padded cyclically so that every rank gets ceil(n / world) of them: under ZeRO-3
    each forward is collective, so all ranks must run the same number of them. Duplicates are dropped on merge."""
    per = -(-n // world)
    mine = list(range(rank, n, world))
    return (mine + list(range(n)))[:per] if mine else list(range(n))[:per]


def _gather_rows(cols: dict[str, list], world: int) -> dict[str, list]:
    """All ranks' reference columns, merged (first occurrence of an id wins), identical on every rank."""
    if world == 1:
        return cols
    import torch.distributed as dist

    parts: list[dict[str, list] | None] = [None] * world
    dist.all_gather_object(parts, cols)
    out: dict[str, list] = {k: [] for k in cols}
    seen: set[str] = set()
    for part in parts:
        for i, eid in enumerate(part["id"]):
            if eid not in seen:
                seen.add(eid)
                for k in out:
                    out[k].append(part[k][i])
    return out


def _reference_logps(
    forward, module, examples, pad_id, cfg, out_dir: Path, model_path: str, rank: int, world: int, note, device
):
    """pi_ref log-probs for every sequence the loss needs, computed once with the initial weights and cached in
    out_dir/ref_logps/<key>.parquet (the key covers the model, the tokenized data and the mode).

    With several ranks each computes an equal share (rank_shard), the shares are all-gathered, and rank 0 alone
    writes the cache. The cache is used only if every rank sees it, so all ranks take the same branch."""
    from solopo.pipeline.io import dir_fingerprint

    mp = Path(model_path)
    model_fp = dir_fingerprint(mp)["sha256"] if mp.is_dir() else model_path
    key = stable_hash(
        {
            "model": model_fp,
            "data": _examples_digest(examples),
            "mode": cfg.mode,
            "ra_ref": cfg.ra_ref,
            "dtype": cfg.dtype,
            "attn": cfg.attn,
        }
    )[:16]
    path = out_dir / "ref_logps" / f"{key}.parquet"
    on = device if device.type == "cuda" else "cpu"  # nccl reduces CUDA tensors, gloo CPU ones
    missing_somewhere = _all_reduce(torch.tensor([float(not path.exists())], device=on), "max")
    if missing_somewhere.item() == 0:
        rows = read_parquet(path).to_pylist()
        note(f"DPO reference log-probs loaded from the cache {path}")
    else:
        was_training = module.training
        module.eval()
        # ra_ref=short reuses pi_ref(y_w | x_short): no long reference forward needed.
        with_long = examples[0].long_w is not None and cfg.ra_ref == "long"
        mine = [examples[i] for i in rank_shard(len(examples), rank, world)]
        desc = "DPO reference log-probs" + (f" (rank 0 of {world}, each 1/{world})" if world > 1 else "")
        cols = compute_ref_logps(
            forward, mine, pad_id, cfg.micro_batch_size, desc, device, with_long, cfg.shared_prefix
        )
        cols = _gather_rows(cols, world)
        module.train(was_training)
        rows = pa.table(cols).to_pylist()
        if rank == 0:
            write_parquet(pa.table(cols), path)
    return {r["id"]: r for r in rows}


def _latest_checkpoint(ckpt_dir: Path, run_key: str) -> Path | None:
    if not ckpt_dir.exists():
        return None
    found = []
    for p in ckpt_dir.glob("step-*"):
        meta = p / "solopo.json"
        if meta.exists() and json.loads(meta.read_text()).get("run_key") == run_key:
            found.append((int(p.name.split("-")[1]), p))
    return max(found)[1] if found else None


def _save_model(
    lm, tokenizer, state_dict, model_dir: Path, dtype: torch.dtype, extra_json: dict[str, dict] | None = None
) -> None:
    tmp = model_dir.with_name(f".{model_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    state_dict = dict(lm.state_dict() if state_dict is None else state_dict)
    # Tied tensors (embeddings = LM head) stay one tensor: cast each distinct storage once.
    cast: dict[tuple, torch.Tensor] = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and v.dtype != dtype:
            key = (v.data_ptr(), v.shape, v.stride())
            cast[key] = cast[key] if key in cast else v.to(dtype)
            state_dict[k] = cast[key]
    lm.save_pretrained(tmp, state_dict=state_dict)
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained states the model's dtype, not the saved one
    write_json(config, tmp / "config.json")
    tokenizer.save_pretrained(tmp)
    for name, obj in (extra_json or {}).items():
        write_json(obj, tmp / name)
    for extra in ("logs.jsonl",):
        if (model_dir / extra).exists():
            shutil.copy2(model_dir / extra, tmp / extra)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _make_writer(cfg, model_dir: Path, rank: int):
    if rank != 0 or cfg.report_to == "none":
        return None
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingDependencyError("tensorboard", "pip install tensorboard", "train.report_to=tensorboard") from e
        return SummaryWriter(log_dir=str(model_dir.with_name(model_dir.name + ".tensorboard")))
    try:
        import wandb
    except ImportError as e:
        raise MissingDependencyError("wandb", "pip install wandb", "train.report_to=wandb") from e
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "solopo"), name=model_dir.name, config=cfg.model_dump())

    class _W:
        def add_scalar(self, k, v, step):
            run.log({k: v}, step=step)

        def close(self):
            run.finish()

    return _W()


def _log_row(row: dict, model_dir: Path, writer) -> None:
    log.info(
        "[train] step %d loss %.4f (po %.4f + ra %.4f) r_w %.3f r_l %.3f acc %.2f ra_dist %.3f %.0f tok/s peak %.2f GB",
        row["step"],
        row["loss"],
        row["po_loss"],
        row["ra_loss"],
        row["reward_chosen"],
        row["reward_rejected"],
        row["reward_acc"],
        row["ra_distance"],
        row["tokens_per_s"],
        row["peak_mem_gb"],
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / "logs.jsonl", "a") as f:  # append-only log; the model dir is replaced at the end
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(f"train/{k}", v, row["step"])


def _plot(history: list[dict], path: Path, title: str) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for k in ("loss", "po_loss", "ra_loss"):
        axes[0].plot(steps, [r[k] for r in history], label=k)
    axes[0].set_title("loss = po + ra")
    for k in ("reward_chosen", "reward_rejected"):
        axes[1].plot(steps, [r[k] for r in history], label=k)
    axes[1].plot(steps, [r["reward_acc"] for r in history], label="reward_acc")
    axes[1].set_title("short rewards")
    axes[2].plot(steps, [r["ra_distance"] for r in history], label="|r_short - r_long|")
    axes[2].set_title("RA distance (chosen)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["TrainingError", "build_ds_config", "compute_ref_logps", "micro_batch_logps", "resolve_params", "train"]
