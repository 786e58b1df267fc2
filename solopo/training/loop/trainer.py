"""The SoLoPO training loop, read top to bottom like a torchtune recipe: setup, loop, finish.

setup:  runtime (distributed env, device, dtype/attention, DeepSpeed choice, SP size checked against the heads)
        -> model (tokenizer, HF model wrapped by CompletionLogps) -> parallel topology (DP x SP; ALST attention)
        -> data (tokenized examples)
        -> optimizer (AdamW/DeepSpeedCPUAdam, scheduler, plain torch or DeepSpeed backend)
        -> DPO reference log-probs (once, cached) -> resume
loop:   for each optimizer step, for each micro-batch:
            short+chosen & short+rejected in one padded forward   (PO pair; x_long in long modes)
            long+chosen in a second forward                       (SoLo-RA, solo mode only)
            loss = sum(per-example loss) / examples in the step    (exact gradient accumulation)
        step, health check, log, checkpoint
finish: save the model in HF format (loads with AutoModelForCausalLM), curves, history; the result dict

This file is the recipe; its parts live beside it: settings.py (train.* resolved against the machine),
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

from solopo.chat import ChatFormat
from solopo.models import model_context_limit
from solopo.pipeline.errors import ConfigError, MissingDependencyError, SolopoError
from solopo.pipeline.io import read_parquet, write_parquet, write_text
from solopo.training import peft as lora
from solopo.training.data import Example, build_examples, context_note, length_grouped_batches, select_target_len
from solopo.training.logprobs import CompletionLogps, use_segment_attention
from solopo.training.losses import OBJECTIVES, LossParams
from solopo.training.model_card import hf_log_row, hf_trainer_files
from solopo.training.seq_parallel import SeqParallel, check_sp, setup_sequence_parallel

from .backends import DeepSpeedBackend, PlainBackend, make_scheduler
from .distributed import barrier, init_distributed
from .outputs import (
    CheckpointClock,
    discard_staging,
    load_latest_checkpoint,
    log_row,
    make_writer,
    model_dirs,
    open_staging,
    plot_curves,
    resume_key,
    save_adapter_model,
    save_model,
    write_checkpoint,
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

FINAL_KEYS = (
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


# --- what setup builds ----------------------------------------------------------------------------------------
class Notes:
    """Choices and fallbacks of this run: to the run context (manifest) if any, else logged on rank 0; all kept
    for the result dict."""

    def __init__(self, ctx=None):
        self.ctx, self.rank, self.items = ctx, 0, []
        self.drops: dict[str, list[str]] = {}

    def __call__(self, msg: str) -> None:
        if self.ctx is not None:
            self.ctx.note(msg)
        elif self.rank == 0:
            log.warning("[train] %s", msg)
        self.items.append(msg)

    def record(self, msg: str) -> None:
        """Recorded, not logged (before the rank is known)."""
        self.items.append(msg)
        if self.ctx is not None:
            self.ctx.note(msg)


@dataclass
class Runtime:
    """Who this process is and how it computes: world = DP degree x SP size; `sp` says which examples (DP rank)
    and which slice of each sequence (SP rank) this rank computes."""

    rank: int
    local_rank: int
    world: int
    device: torch.device
    use_ds: bool
    dtype: torch.dtype
    attn: str
    sp: SeqParallel = field(default_factory=SeqParallel)


@dataclass
class Model:
    tokenizer: Any
    pad_id: int
    lm: torch.nn.Module  # the HF model (saved at the end)
    module: CompletionLogps  # what the backend trains: lm + chunked completion log-probs
    ds_config: dict | None
    keep_alive: Any = None  # HfDeepSpeedConfig for ZeRO-3 (transformers reads it through a weakref)
    peft_model: Any = None  # train.peft: the PeftModel around lm (reference switch, adapter saving)
    base_path: str = ""  # the base model's path: the adapter is merged into it at the end


@dataclass
class Data:
    examples: list[Example]
    target_len: int | None
    with_long: bool  # the (x_long, y_w) forward runs (SoLo-RA)


@dataclass
class Schedule:
    global_batch: int  # examples per optimizer step over all DP groups
    per_step: int  # examples per optimizer step in this rank's DP group
    steps_per_epoch: int
    total_steps: int


@dataclass
class Paths:
    model_dir: Path
    ckpt_dir: Path
    run_key: str  # checkpoints resume only into the same math: config (less _NOT_MATH), model, seed, world, data
    staging: Path  # logs, then the model, until the model is saved (outputs.model_dirs)


@dataclass
class RunState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


# --- the whole run ------------------------------------------------------------------------------------------
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
    chat: ChatFormat | None = None,
) -> dict[str, Any]:
    t_start = time.time()
    chat = chat or ChatFormat()
    note = Notes(ctx)
    cfg, rt = setup_runtime(cfg, model_path, note, trust_remote_code)
    params = resolve_params(cfg)
    random.seed(seed)
    torch.manual_seed(seed)
    _log_header(cfg, params, rt)
    model = setup_model(cfg, model_path, rt, note, trust_remote_code, chat)
    setup_parallel(cfg, model, rt, note)  # rt.sp: DP x SP groups, ALST attention under SP
    context = model_context_limit(model_path, trust_remote_code)
    data = setup_data(cfg, params, table, data_path, source, model.tokenizer, rt, note, context, chat)
    sched = plan_steps(cfg, len(data.examples), rt)
    backend = setup_backend(cfg, model, sched, rt)  # rt.device: the engine's under DeepSpeed
    paths = run_paths(cfg, out_dir, model_path, seed, data, rt)
    ref = None
    if cfg.algo == "dpo":  # the initial weights are the reference: computed once, cached with the data
        with lora.reference_context(model.peft_model):  # LoRA: the adapter disabled, i.e. the base model
            ref = reference_logps(
                backend.forward, model.module, data.examples, model.pad_id, cfg, Path(out_dir), model_path,
                rt.rank, rt.world, note, rt.device, rt.sp,
            )  # fmt: skip
    state = resume(cfg, backend, paths, rt, note)

    t_loop, start_step = time.time(), state.step
    train_loop(cfg, params, backend, model, data, sched, paths, ref, state, seed, rt)
    loop_seconds = time.time() - t_loop

    save_outputs(cfg, backend, model, data, sched, paths, state, start_step, loop_seconds, rt)
    out = result(cfg, params, paths, data, state, rt, note, time.time() - t_start)
    return {**out, "peft": lora.describe(model.peft_model, cfg)}


# --- setup --------------------------------------------------------------------------------------------------
def setup_runtime(cfg, model_path: str, note: Notes, trust_remote_code: bool = False):
    """(cfg with train.deepspeed=auto resolved, Runtime): the process group is up when this returns."""
    if cfg.sp_size == "auto":  # the train stage resolves it from the memory plan before launching
        raise ConfigError(
            [
                "train.sp_size=auto reached the training loop unresolved: run it through `solopo train` "
                "(its memory plan picks the size), or set train.sp_size to a number"
            ]
        )
    world = int(os.environ.get("WORLD_SIZE", 1))
    ds_choice, ds_why = resolve_deepspeed(cfg, model_path, world, pick_dtype(cfg.dtype), trust_remote_code)
    if cfg.deepspeed == "auto":
        cfg = cfg.model_copy(update={"deepspeed": ds_choice})
        note.record(f"train.deepspeed=auto -> {ds_choice} ({ds_why})")  # a choice (the rank is not known yet)
    use_ds = cfg.deepspeed != "none"
    rank, local_rank, world = init_distributed(use_ds)
    note.rank = rank
    check_sp(cfg, model_path, world)  # before any weights load: heads and ranks divisible by train.sp_size
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    attn = pick_attn(cfg.attn)
    if cfg.shared_prefix and attn == "flash_attention_2":
        attn = "sdpa"
        note("shared_prefix packs chosen and rejected with a custom attention mask: using sdpa, not flash-attn")
    if cfg.attn == "auto" and torch.cuda.is_available() and attn == "sdpa" and not cfg.shared_prefix:
        note("flash-attn is not installed: using sdpa attention (pip install flash-attn for the varlen kernels)")
    sp = SeqParallel(dp_rank=rank, dp_size=world)  # data parallel over all ranks until setup_parallel
    return cfg, Runtime(rank, local_rank, world, device, use_ds, pick_dtype(cfg.dtype), attn, sp)


def _log_header(cfg, params: LossParams, rt: Runtime) -> None:
    if rt.rank == 0:
        log.info(
            "[train] %s-%s alpha=%g beta=%g on %s x%d%s, dtype %s, attention %s, deepspeed %s%s",
            cfg.algo,
            cfg.mode,
            params.alpha,
            params.beta,
            rt.device.type,
            rt.world,
            f" (sequence parallel {cfg.sp_size} x data parallel {rt.world // cfg.sp_size})" if cfg.sp_size > 1 else "",
            rt.dtype,
            rt.attn,
            cfg.deepspeed,
            ", shared prefix (prompt computed once per pair)" if cfg.shared_prefix else "",
        )


def setup_model(
    cfg, model_path: str, rt: Runtime, note: Notes, trust_remote_code: bool = False, chat: ChatFormat | None = None
) -> Model:
    """Tokenizer and policy. The DeepSpeed config exists first: ZeRO-3 loads the weights partitioned. The tokenizer
    carries run.chat_template when one is given, so the saved model serves with the template it was trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ds_config = build_ds_config(cfg, rt.dtype, rt.world) if rt.use_ds else None
    keep_alive = None
    if rt.use_ds and cfg.deepspeed == "zero3":
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if chat is not None:
        chat.check(tokenizer)  # a config error before the weights load
        chat.apply_to(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lm = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=rt.dtype,
        attn_implementation=rt.attn,
        trust_remote_code=trust_remote_code,
        **lora.load_kwargs(cfg, rt.dtype),
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
    # train.peft: LoRA layers injected into `lm` in place; peft_model (None without) is the reference switch.
    peft_model = lora.wrap(lm, cfg, zero3=cfg.deepspeed == "zero3", note=note)
    if cfg.shared_prefix and not use_segment_attention(lm):
        note(f"shared_prefix with {rt.attn} attention builds a dense (b, 1, s, s) mask (O(s^2)); sdpa avoids it")
    # ZeRO-3 gathers the LM head's weights at every chunk call: ranks must agree on the chunk count.
    module = CompletionLogps(
        lm,
        chunk_size=cfg.logps_chunk,
        sync_chunks=cfg.deepspeed == "zero3" and rt.world > 1,
        reentrant_head=peft_model is not None and cfg.deepspeed == "zero3",  # frozen head under ZeRO-3
    )
    if not rt.use_ds:
        module.to(rt.device)
    return Model(tokenizer, pad_id, lm, module, ds_config, keep_alive, peft_model, model_path)


def setup_parallel(cfg, model: Model, rt: Runtime, note: Notes) -> None:
    """The parallel topology: data parallel over all ranks, or (train.sp_size > 1) world / sp_size DP groups of
    sp_size ranks that split each sequence (DeepSpeed ALST). After the model: ALST wraps its final attention."""
    zero_stage = 3 if cfg.deepspeed == "zero3" else 2
    rt.sp = setup_sequence_parallel(model.lm, cfg.sp_size, rt.rank, rt.world, zero_stage)
    model.module.sp = rt.sp
    if rt.sp.on:
        note(
            f"train.sp_size={rt.sp.size}: {rt.sp.dp_size} data-parallel group(s) of {rt.sp.size} ranks, each rank "
            f"decoding 1/{rt.sp.size} of every row (DeepSpeed ALST over {rt.attn} attention)"
        )


def setup_data(
    cfg, params: LossParams, table, data_path, source: str, tokenizer, rt: Runtime, note: Notes,
    context: int | None = None, chat: ChatFormat | None = None,
) -> Data:  # fmt: skip
    """The triplets at the chosen target length, tokenized; drops are recorded (manifest) and logged. Sequences
    longer than the model's `context` are dropped too (over_model_context), with a note."""
    if table is None:
        if data_path is None:
            raise SolopoError("train() needs a table or a data_path")
        table = read_parquet(data_path)
    table, target_len = select_target_len(table, cfg.target_len, source)
    # The (x_long, y_w) forward only exists for SoLo-RA; solo with alpha=0 is the short-only baseline.
    with_long = cfg.mode == "solo" and params.alpha > 0
    examples, drops = build_examples(table, tokenizer, cfg.mode, with_long, source, cfg.max_length, context, chat)
    if drops.get("over_model_context"):
        note(context_note(len(drops["over_model_context"]), context))
    for reason, ids in drops.items():
        note.drops[reason] = ids
        if note.ctx is not None:
            for i in ids:
                note.ctx.drop(reason, example=i)
        if rt.rank == 0:
            log.warning("[train] dropped %d example(s): %s (e.g. %s)", len(ids), reason, ids[:3])
    if not examples:
        raise SolopoError(f"no training examples left from {source} (drops: { {k: len(v) for k, v in drops.items()} })")
    return Data(examples, target_len, with_long)


def plan_steps(cfg, n_examples: int, rt: Runtime) -> Schedule:
    per_step = cfg.micro_batch_size * cfg.grad_accum
    global_batch = per_step * rt.sp.dp_size
    steps_per_epoch = max(1, math.ceil(n_examples / global_batch))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return Schedule(global_batch, per_step, steps_per_epoch, total_steps)


def setup_backend(cfg, model: Model, sched: Schedule, rt: Runtime) -> PlainBackend:
    """Optimizer and scheduler behind plain torch or a DeepSpeed engine."""
    module = model.module
    optimizer = torch.optim.AdamW(lora.trainable(module), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if rt.use_ds and cfg.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(lora.trainable(module), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, sched.total_steps)
    if not rt.use_ds:
        return PlainBackend(module, optimizer, scheduler, cfg)
    try:
        import deepspeed
    except ImportError as e:
        raise MissingDependencyError("deepspeed", "pip install deepspeed", f"train.deepspeed={cfg.deepspeed}") from e
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=model.ds_config, mpu=rt.sp.mpu
    )
    rt.device = engine.device if hasattr(engine, "device") else rt.device
    return DeepSpeedBackend(engine, cfg)


def run_paths(cfg, out_dir, model_path: str, seed: int, data: Data, rt: Runtime) -> Paths:
    model_dir, ckpt_dir, staging = model_dirs(out_dir, cfg)
    run_key = resume_key(cfg, model=model_path, seed=seed, world=rt.world, data=examples_digest(data.examples))
    return Paths(model_dir, ckpt_dir, run_key, staging)


def resume(cfg, backend: PlainBackend, paths: Paths, rt: Runtime, note: Notes) -> RunState:
    """The newest loadable checkpoint of this very run (run_key), else step 0; starts (or continues) logs.jsonl
    in the staging dir."""
    state = RunState()
    if cfg.resume:
        state.step, state.history = load_latest_checkpoint(backend, paths.ckpt_dir, paths.run_key, rt.rank, note)
    if rt.rank == 0:
        # A fresh run starts a fresh log; a resumed one continues the checkpoint's (rows after it are redone).
        open_staging(paths.model_dir, paths.staging)
        logged = [r for r in state.history if r["step"] % cfg.logging_steps == 0]
        write_text("".join(json.dumps(hf_log_row(r)) + "\n" for r in logged), paths.staging / "logs.jsonl")
        log.info("[train] per-step log: %s (becomes %s once the model is saved)", paths.staging, paths.model_dir)
    return state


# --- loop ---------------------------------------------------------------------------------------------------
def train_loop(
    cfg, params: LossParams, backend: PlainBackend, model: Model, data: Data, sched: Schedule, paths: Paths,
    ref: dict | None, state: RunState, seed: int, rt: Runtime,
) -> None:  # fmt: skip
    """Optimizer steps until total_steps; state.step/history advance in place (checkpoints: CheckpointClock)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    objective = OBJECTIVES[cfg.algo]
    writer = make_writer(cfg, paths.model_dir, rt.rank)
    lengths = [e.tokens for e in data.examples]
    model.module.train()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    clock = CheckpointClock(cfg, rt.world, rt.device)
    bar = tqdm(total=sched.total_steps, initial=state.step, desc=f"train {cfg.algo}-{cfg.mode}", disable=rt.rank != 0)
    try:
        # Log lines go through the bar (tqdm.write) instead of running into it on the console.
        with logging_redirect_tqdm():  # root handlers (the CLI logs there)
            while state.step < sched.total_steps:
                epoch, in_epoch = divmod(state.step, sched.steps_per_epoch)
                # Global batches of this epoch; this rank's DP group takes its slice of each.
                batches = length_grouped_batches(lengths, sched.global_batch, seed, epoch)
                dp = rt.sp.dp_rank
                step_idx = batches[in_epoch][dp * sched.per_step : (dp + 1) * sched.per_step]
                t0 = time.time()
                agg = train_step(
                    backend, objective, params, [data.examples[i] for i in step_idx], cfg, model.pad_id,
                    data.with_long, rt.device, ref,
                )  # fmt: skip
                state.step += 1
                # Gradients, updated weights and losses finite, or stop here: no checkpoint, no model, no _SUCCESS.
                grad_norm, nonfinite = step_health(backend.grad_norm, backend.local_params(), agg.losses, rt.device)
                if nonfinite:
                    raise nonfinite_error(nonfinite, state.step, agg.ids, agg.losses, cfg, rt.rank)
                row = agg.finish(time.time() - t0, rt.device, rt.sp.size)
                # epoch as HF logs it: optimizer steps done / steps per epoch (fractional)
                row.update(
                    step=state.step, epoch=state.step / sched.steps_per_epoch, lr=backend.lr(), grad_norm=grad_norm
                )
                state.history.append(row)
                if rt.rank == 0 and (state.step % cfg.logging_steps == 0 or state.step == sched.total_steps):
                    log_row(row, paths.staging, writer)
                    bar.set_postfix(
                        loss=f"{row['loss']:.4f}", acc=f"{row['reward_acc']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}"
                    )
                bar.update(1)
                if clock.due(state.step, sched.total_steps):
                    write_checkpoint(
                        backend, paths.ckpt_dir, state.step, {"history": state.history}, paths.run_key, rt.rank,
                        cfg.save_total_limit,
                    )  # fmt: skip
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


# --- finish -------------------------------------------------------------------------------------------------
def save_outputs(
    cfg, backend: PlainBackend, model: Model, data: Data, sched: Schedule, paths: Paths, state: RunState,
    start_step: int, loop_seconds: float, rt: Runtime,
) -> None:  # fmt: skip
    """The final model in HF format (training dtype unless train.save_dtype=fp32), curves and history, swapped in
    with this run's logs.jsonl; the checkpoints go once the model is written."""
    pm = model.peft_model
    sd = backend.full_state_dict() if pm is None else lora.adapter_state_dict(pm, cfg, rt.rank)
    check_state_finite(sd if rt.rank == 0 else None, rt.device)
    if rt.rank == 0:
        save_dtype = torch.float32 if cfg.save_dtype == "fp32" else rt.dtype
        hf_files = hf_trainer_files(
            state.history[start_step:],
            state.history,
            cfg,
            steps_per_epoch=sched.steps_per_epoch,
            total_steps=sched.total_steps,
            examples=len(data.examples),
            seconds=loop_seconds,
            n_params=sum(getattr(p, "ds_numel", p.numel()) for n, p in model.lm.named_parameters() if "embed" not in n),
            world=rt.world,
        )
        plot_curves(state.history, paths.staging / "training_curves.png", f"{cfg.algo}-{cfg.mode}")
        write_parquet(
            pa.Table.from_pylist(state.history) if state.history else pa.table({}),
            paths.staging / "history.parquet",
        )
        # logs, curves, history and the weights swapped in at once
        if pm is None:
            save_model(model.lm, model.tokenizer, sd, paths.model_dir, save_dtype, hf_files, staging=paths.staging)
        else:
            save_adapter_model(
                pm, model.tokenizer, sd, paths.model_dir, save_dtype, model.base_path, cfg.merge_adapter, hf_files,
                staging=paths.staging,
            )  # fmt: skip
        shutil.rmtree(paths.ckpt_dir, ignore_errors=True)
    barrier()


def result(
    cfg, params: LossParams, paths: Paths, data: Data, state: RunState, rt: Runtime, note: Notes, seconds: float
) -> dict[str, Any]:
    last = state.history[-1] if state.history else {}
    tail = state.history[-max(1, min(len(state.history), 5)) :]
    final = {k: last[k] for k in FINAL_KEYS if k in last}
    if tail:
        final["loss_last5_mean"] = sum(r["loss"] for r in tail) / len(tail)
    dtype = str(rt.dtype).removeprefix("torch.")
    return {
        "model_path": str(paths.model_dir.resolve()),
        "algo": cfg.algo,
        "mode": cfg.mode,
        "alpha": params.alpha,
        "beta": params.beta,
        "steps": state.step,
        "examples": len(data.examples),
        "target_len": data.target_len,
        "final": final,
        "seconds": round(seconds, 2),
        "tokens_per_s": last.get("tokens_per_s"),
        "peak_mem_gb": max((r["peak_mem_gb"] for r in state.history), default=None),
        "world_size": rt.world,
        "sp_size": rt.sp.size,
        "attn": rt.attn,
        "dtype": dtype,
        "save_dtype": "float32" if cfg.save_dtype == "fp32" else dtype,
        "deepspeed": cfg.deepspeed,
        "notes": note.items,
        "drops": note.drops,
    }
