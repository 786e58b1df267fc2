"""The SoLoPO training loop (reads top to bottom, nanoGPT style).

setup: distributed env -> dtype/attention -> DeepSpeed config -> model -> tokenized examples
       -> DPO reference log-probs (once, cached) -> optimizer/scheduler -> backend -> resume
loop:  for each optimizer step, for each micro-batch:
           short+chosen & short+rejected in one padded forward   (PO pair; x_long in long modes)
           long+chosen in a second forward                       (SoLo-RA, solo mode only)
           loss = sum(per-example loss) / examples in the step    (exact gradient accumulation)
       step, log, checkpoint
end:   save the model in HF format (loads with AutoModelForCausalLM)

This file is the loop itself; its parts live beside it: settings.py (train.* resolved against the machine),
distributed.py (process-group helpers), backends.py (plain torch or DeepSpeed), step.py (one optimizer step, the
hot path, and the numerical health check), reference.py (DPO reference log-probs), outputs.py (checkpoints, the HF
model, logs and curves).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from solopo.pipeline.errors import MissingDependencyError, SolopoError
from solopo.pipeline.io import read_parquet, write_parquet, write_text
from solopo.training.data import (
    build_examples,
    context_note,
    length_grouped_batches,
    select_target_len,
)
from solopo.training.logprobs import CompletionLogps, use_segment_attention
from solopo.training.losses import (
    OBJECTIVES,
)
from solopo.training.model_card import hf_trainer_files

from .backends import DeepSpeedBackend, PlainBackend, make_scheduler
from .distributed import barrier, init_distributed
from .outputs import (
    CheckpointClock,
    discard_staging,
    log_row,
    make_writer,
    model_dirs,
    open_staging,
    plot_curves,
    resume,
    resume_key,
    save_checkpoint,
    save_model,
)
from .reference import examples_digest, reference_logps
from .settings import (
    TrainingError,
    build_ds_config,
    pick_attn,
    pick_dtype,
    resolve_deepspeed,
    resolve_params,
)
from .step import check_state_finite, disable_dropout, nonfinite_error, step_health, train_step

log = logging.getLogger("solopo")


# --- the whole run ------------------------------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


def train(cfg, model_path: str, out_dir: str | Path = "runs/train", **kw: Any) -> dict[str, Any]:
    """Train one model; returns the result (model path, steps, final metrics). Runs on every rank. However it
    ends, the run's staging dir (logs, then the model) is gone: renamed into place, or removed on failure."""
    try:
        return _train(cfg, model_path, out_dir=out_dir, **kw)
    finally:
        discard_staging(out_dir, cfg)


def _train(
    cfg,
    model_path: str,
    table: pa.Table | None = None,
    data_path: str | None = None,
    out_dir: str | Path = "runs/train",
    seed: int = 0,
    source: str = "export/data.parquet",
    ctx=None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solopo.models import model_context_limit

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
    ds_choice, ds_why = resolve_deepspeed(
        cfg, model_path, int(os.environ.get("WORLD_SIZE", 1)), pick_dtype(cfg.dtype), trust_remote_code
    )
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
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lm = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code
    )
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
    context = model_context_limit(model_path, trust_remote_code)
    examples, drops = build_examples(table, tokenizer, cfg.mode, with_long, source, cfg.max_length, context)
    if drops.get("over_model_context"):
        note(context_note(len(drops["over_model_context"]), context))
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
    model_dir, ckpt_dir, staging = model_dirs(out_dir, cfg)
    run_key = resume_key(cfg, model=model_path, seed=seed, world=world, data=examples_digest(examples))

    # -- DPO reference log-probs, once, with the initial weights (= the reference); cached with the data
    ref = None
    if cfg.algo == "dpo":
        ref = reference_logps(forward, module, examples, pad_id, cfg, out_dir, model_path, rank, world, note, device)

    # -- resume
    state = RunState()
    if cfg.resume:
        state.step, state.history = resume(backend, ckpt_dir, run_key, rank, note)

    if rank == 0:
        # A fresh run starts a fresh log; a resumed one continues the checkpoint's (rows after it are redone).
        open_staging(model_dir, staging)
        logged = [r for r in state.history if r["step"] % cfg.logging_steps == 0]
        write_text("".join(json.dumps(r) + "\n" for r in logged), staging / "logs.jsonl")
        log.info("[train] per-step log: %s (becomes %s when the model is saved)", staging / "logs.jsonl", model_dir)
    clock = CheckpointClock(cfg, world, device)

    # -- loop
    objective = OBJECTIVES[cfg.algo]
    writer = make_writer(cfg, model_dir, rank)
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
                log_row(row, staging, writer)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}", acc=f"{row['reward_acc']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}"
                )
            bar.update(1)
            if clock.due(state.step, total_steps):
                save_checkpoint(
                    backend, ckpt_dir, state.step, {"history": state.history}, run_key, rank, cfg.save_total_limit
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
        plot_curves(state.history, staging / "training_curves.png", f"{cfg.algo}-{cfg.mode}")
        write_parquet(
            pa.Table.from_pylist(state.history) if state.history else pa.table({}), staging / "history.parquet"
        )
        save_model(lm, tokenizer, sd, model_dir, save_dtype, hf_files, staging=staging)  # all of it swapped in at once
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    barrier()
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
