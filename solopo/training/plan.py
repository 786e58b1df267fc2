"""`solopo plan`: the per-rank peak memory of a training run, and the settings that fit, before anything loads.

The model comes from its config.json only. Activation memory is not a rule of thumb: the run's own step
(`micro_batch_logps` -> `CompletionLogps` with its checkpointed layers and chunked LM head -> the objective ->
backward) is executed under torch's FakeTensorMode, where tensors have shapes but no data, and every storage an
op creates is counted while it is alive. That gives the peak of live tensors of a forward+backward at any length
in seconds, whatever the model size, with what this code really keeps: the checkpoints of every layer, the one layer
recomputed in backward, the fp32 norm copies, the logits chunk and its gradient, and the gradients as backward
produces them. Weights, gradients and optimizer state per ZeRO stage and offload are counted from the parameter
count; sequence parallelism (Ulysses) shards every sequence over `sp` ranks, so its trace runs at 1/sp of each
length. bench/plan/ sets these predictions beside measured peaks (CPU RSS here, the committed GPU runs).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import weakref
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from solopo.pipeline.errors import SolopoError

log = logging.getLogger("solopo")

GIB = 2**30
# The order in which the plan assumes the settings run, fastest first (for one sp and the same LoRA choice):
# no ZeRO (nothing gathered, one gradient all-reduce) < ZeRO-2 (replicated weights, sharded grads/optimizer) <
# ZeRO-3 (every layer's weights gathered in forward and again in backward) < optimizer offload (the update on
# the CPU, grads over PCIe) < full offload (weights over PCIe too). A larger sp is slower (two all-to-alls per
# layer, fewer data-parallel replicas); full fine-tuning is preferred to LoRA, which trains something else.
SPEED_ORDER = (("none", "none"), ("zero2", "none"), ("zero3", "none"), ("zero2", "optimizer"), ("zero3", "optimizer"),
               ("zero3", "full"))  # fmt: skip
DEFAULT_MARGIN = 0.10  # of the GPU kept free: CUDA context, NCCL buffers, allocator fragmentation
EMBEDDED = "SmolLM2-135M-Instruct (embedded)"
TEMPLATE_TOKENS = 16
CUDA_ALLOC_FACTOR = 1.19  # see Machine.alloc_factor  # chat-template tokens around a prompt/answer that the export's token counts do not include


class PlanError(SolopoError):
    """The plan cannot be made (an unreadable model config, an architecture the trace cannot run)."""


# --- inputs -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunShape:
    """What sets activation memory: the mode's sequences and the step's settings. Lengths are tokens per
    sequence (prompt; the completion is added), the longest the run will see."""

    mode: str = "solo"
    algo: str = "orpo"
    long_len: int = 8192
    short_len: int = 1024
    completion: int = 128
    micro_batch: int = 1
    gradient_checkpointing: bool = True
    logps_chunk: int = 1024
    shared_prefix: bool = False
    orpo_sequence_nll: bool = False

    @classmethod
    def from_train_config(cls, cfg: Any, long_len: int, short_len: int = 1024, completion: int = 128) -> RunShape:
        return cls(
            mode=cfg.mode,
            algo=cfg.algo,
            long_len=long_len,
            short_len=short_len,
            completion=completion,
            micro_batch=cfg.micro_batch_size,
            gradient_checkpointing=cfg.gradient_checkpointing,
            logps_chunk=cfg.logps_chunk,
            shared_prefix=cfg.shared_prefix,
            orpo_sequence_nll=cfg.algo == "orpo" and getattr(cfg, "orpo_nll", "completion") == "sequence",
        )

    @property
    def has_long(self) -> bool:
        return self.mode != "short"


@dataclass(frozen=True)
class Combo:
    zero: str = "none"  # none | zero2 | zero3
    offload: str = "none"  # none | optimizer | full
    sp: int = 1
    peft: str = "none"  # none | lora | qlora

    @property
    def label(self) -> str:
        z = {"none": "plain", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}[self.zero]
        off = {"none": "", "optimizer": "+off-opt", "full": "+off-all"}[self.offload]
        return f"{z}{off} sp{self.sp}" + ("" if self.peft == "none" else f" {self.peft}")


@dataclass
class ModelFacts:
    name: str
    path: str  # what transformers loads it from (a dir or a hub id)
    config: Any
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int | None
    largest_module: int  # parameters of the biggest decoder layer or the embedding/head (ZeRO-3's live set)
    linear_shapes: list[tuple[int, int]] = field(default_factory=list)  # (in, out) of every decoder nn.Linear

    def lora_params(self, r: int) -> int:
        """LoRA on every linear layer of the decoder (train.lora default): r * (in + out) each."""
        return sum(r * (i + o) for i, o in self.linear_shapes)


def load_model_facts(model: str | None) -> ModelFacts:
    """The model's config.json (embedded default, a local dir, or a hub id in the local cache) on the meta device:
    counts only, no weights."""
    from transformers import AutoConfig

    from solopo.models import resolve_model

    local = Path(model).expanduser() if model else None
    if local is not None and (local / "config.json").is_file():
        path = str(local.resolve())  # a config.json is all the plan reads: no weights or tokenizer needed
    else:
        path = resolve_model(model)  # the embedded model; a hub id: in the local cache, or a clear error
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PlanError(f"--model {model}: cannot read its config.json ({str(e).splitlines()[0][:200]})") from None
    return facts_from_config(cfg, Path(path).name if Path(path).exists() and model else (model or EMBEDDED), path)


def facts_from_config(cfg: Any, name: str, path: str | None = None) -> ModelFacts:
    """Counts of a transformers config, from the model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise PlanError(f"{name}: not a causal LM transformers can build ({e})") from None
    text = getattr(cfg, "text_config", None) or cfg
    decoder = lm.get_decoder()
    layers = list(getattr(decoder, "layers", []))
    layer_params = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    linears = [(m.in_features, m.out_features) for x in layers for m in x.modules() if isinstance(m, torch.nn.Linear)]
    heads = int(text.num_attention_heads)
    return ModelFacts(
        name=name,
        path=path or name,
        config=cfg,
        params=sum(p.numel() for p in lm.parameters()),
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        vocab=int(text.vocab_size),
        max_positions=getattr(text, "max_position_embeddings", None),
        largest_module=max(layer_params, lm.get_input_embeddings().weight.numel()),
        linear_shapes=linears,
    )


# --- sequence parallelism: which sizes the heads allow ----------------------------------------------------------
def sp_constraint(facts: ModelFacts) -> str:
    return (
        f"{facts.heads} attention heads and {facts.kv_heads} KV heads: Ulysses needs heads % sp == 0 and "
        f"(kv_heads % sp == 0 or sp % kv_heads == 0, KV heads then replicated)"
    )


def valid_sp_sizes(facts: ModelFacts, gpus: int) -> list[int]:
    """The sp sizes ALST accepts for the model's heads that also divide the job's GPUs."""
    from solopo.training.seq_parallel import valid_sp_sizes as allowed

    return [s for s in allowed(facts.heads, facts.kv_heads, limit=max(1, gpus)) if max(1, gpus) % s == 0]


# --- the activation trace ----------------------------------------------------------------------------------------
class _LiveBytes:
    """Counts the bytes of every tensor storage that ops create, while it is alive, and its peak. A tensor made
    in backward with a parameter's shape counts as a gradient: with two forwards per step (solo mode) the long
    forward's weight gradients wait in autograd's buffers for the pair's before they reach `.grad`."""

    def __init__(self, param_shapes: set[tuple[int, ...]]) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    tracker.track(t)
                return out

        self.mode = Mode()
        self.param_shapes = param_shapes
        self.seen = WeakIdKeyDictionary()  # storage -> (size, weakref whose callback uncounts it)
        self.cur = self.peak = self.grads = self.grads_at_peak = 0

    def track(self, t: Any, grad: bool | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        if st in self.seen:
            return
        if grad is None:
            grad = torch._C._current_graph_task_id() != -1 and tuple(t.shape) in self.param_shapes
        n = st.nbytes()
        self.seen[st] = (n, weakref.ref(st, partial(self._free, n, grad)))
        self.cur += n
        self.grads += n if grad else 0
        if self.cur > self.peak:
            self.peak, self.grads_at_peak = self.cur, self.grads

    def _free(self, n: int, grad: bool, _ref: Any) -> None:
        self.cur -= n
        self.grads -= n if grad else 0

    def reset_peak(self) -> None:
        self.peak, self.grads_at_peak = self.cur, self.grads


@dataclass
class Trace:
    """One traced forward+backward (bytes): the peak of live tensors beyond the weights, the gradients alive at
    that peak (plain torch keeps them), and the LM-head chunk's own peak (logits and their gradient)."""

    peak_over_weights: int
    grads_at_peak: int
    logits: int

    @property
    def activations(self) -> int:  # everything but the gradients: checkpoints, the recomputed layer, logits
        return self.peak_over_weights - self.grads_at_peak


@functools.lru_cache(maxsize=4)
def _fake_model(config_json: str, dtype_name: str, gradient_checkpointing: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from solopo.training.logprobs import use_segment_attention

    d = json.loads(config_json)
    cfg = AutoConfig.for_model(**d)
    cfg._attn_implementation = "sdpa"
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, torch.device("cpu"):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype_name))
    lm.config.use_cache = False
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Fake tensors look like tracing to transformers, which then builds the dense (s, s) causal mask that a
    # real run skips (no padding: sdpa runs is_causal). The segment attention's mask builder gives None without a
    # padding mask, as a real run does; with segments it is the shared-prefix row's own attention.
    use_segment_attention(lm)
    return fake, lm


def _example(shape: RunShape, sp: int):
    from solopo.training.data import Example, Seq

    def ids(n: int) -> list[int]:
        return [7] * max(1, math.ceil(n / sp))  # the values do not matter; the lengths do

    # Ulysses shards every sequence of the step over the sp group; each rank holds 1/sp of each
    w = ids(shape.completion)
    if shape.mode in ("solo", "short"):
        x = ids(shape.short_len)
        long_w = Seq(ids(shape.long_len), w) if shape.mode == "solo" else None
        return Example("plan", Seq(x, w), Seq(x, list(w)), long_w)
    x = ids(shape.long_len)
    return Example("plan", Seq(x, w), Seq(x, list(w)), None)


def trace_step(facts: ModelFacts, shape: RunShape, dtype: torch.dtype, sp: int = 1) -> Trace:
    """Run the training step's forward and backward on fake tensors and count live bytes (one rank)."""
    try:
        return _trace_step(facts.config.to_json_string(use_diff=False), shape, str(dtype).removeprefix("torch."), sp)
    except SolopoError:
        raise
    except Exception as e:  # an op without a fake kernel, an architecture the step does not support
        raise PlanError(
            f"cannot trace a training step of {facts.name} ({type(e).__name__}: {str(e)[:300]}); the plan needs the "
            "model's forward to run on torch's FakeTensorMode"
        ) from e


@functools.lru_cache(maxsize=64)
def _trace_step(config_json: str, shape: RunShape, dtype_name: str, sp: int) -> Trace:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from solopo.training.logprobs import CompletionLogps, chunked_token_logps
    from solopo.training.loop.settings import resolve_params
    from solopo.training.loop.step import micro_batch_logps
    from solopo.training.losses import OBJECTIVES

    fake, lm = _fake_model(config_json, dtype_name, shape.gradient_checkpointing)
    module = CompletionLogps(lm, chunk_size=shape.logps_chunk).train()
    params = resolve_params(_AlgoMode(shape.algo, shape.mode))
    with_long = shape.mode == "solo" and params.alpha > 0
    live = _LiveBytes({tuple(p.shape) for p in module.parameters()})

    def forward(*args, **kwargs):
        with fake:
            return module(*args, **kwargs)

    try:
        with live.mode:
            for p in module.parameters():
                live.track(p, grad=False)
            weights = live.cur
            live.reset_peak()
            with unset_fake_temporarily():  # collation runs on the host with real tensors, as in training
                batch, _ = micro_batch_logps(
                    forward,
                    [_example(shape, sp)] * shape.micro_batch,
                    0,
                    with_long,
                    shape.orpo_sequence_nll,
                    torch.device("cpu"),
                    shape.shared_prefix,
                )
            with fake:
                if shape.algo == "dpo":
                    zeros = torch.zeros(shape.micro_batch)
                    batch.ref_chosen = batch.ref_rejected = zeros
                    batch.ref_long_w = zeros if batch.long_w is not None else None
                OBJECTIVES[shape.algo](batch, params).loss.sum().backward()
            peak, grads = live.peak - weights, live.grads_at_peak
            # the LM head alone: one chunk's logits, log-softmax and their gradients
            head = lm.get_output_embeddings()
            ex = _example(shape, sp)
            targets = len(ex.chosen) if shape.orpo_sequence_nll else len(ex.chosen.completion)
            rows = min(shape.logps_chunk, 2 * shape.micro_batch * targets)  # the pair's targets, at most a chunk
            with fake:
                h = torch.zeros(rows, lm.config.hidden_size, dtype=head.weight.dtype, requires_grad=True)
                y = torch.zeros(rows, dtype=torch.long)
                base = live.cur
                live.reset_peak()
                chunked_token_logps(head, h, y, shape.logps_chunk).sum().backward()
                logits = live.peak - base - head.weight.numel() * head.weight.element_size()  # minus its grad
    finally:
        for p in module.parameters():
            p.grad = None
    return Trace(peak_over_weights=peak, grads_at_peak=grads, logits=max(0, logits))


@dataclass(frozen=True)
class _AlgoMode:  # what resolve_params reads
    algo: str
    mode: str
    alpha: float | None = None
    beta: float | None = None
    gamma: float = 0.5
    orpo_lambda: float = 0.1


# --- per-rank memory of one combination ----------------------------------------------------------------------
@dataclass
class Estimate:
    combo: Combo
    weights: float  # GiB per rank, at the step's peak
    gradients: float
    optimizer: float
    activations: float  # checkpoints, the recomputed layer, temporaries (logits excluded)
    logits: float  # the LM-head chunk: logits, log-softmax and their gradients
    total: float
    host_gb: float  # CPU memory per node for what is offloaded
    fits: bool
    max_len: int | None  # longest long prompt that fits with the margin (None: the mode has no long sequence)
    max_len_capped: bool = False  # the search stopped at its limit: at least max_len

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["combo"] = asdict(self.combo) | {"label": self.combo.label}
        return d


@dataclass
class Plan:
    model: str
    params: int
    gpus: int
    gpu_mem_gb: float
    margin: float
    dtype: str
    shape: RunShape
    sp_constraint: str
    valid_sp: list[int]
    estimates: list[Estimate]
    choice: Estimate | None
    speed_order: str
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "params": self.params,
            "gpus": self.gpus,
            "gpu_mem_gb": self.gpu_mem_gb,
            "margin": self.margin,
            "budget_gb": round(self.gpu_mem_gb * (1 - self.margin), 2),
            "dtype": self.dtype,
            "shape": asdict(self.shape),
            "sp_constraint": self.sp_constraint,
            "valid_sp": self.valid_sp,
            "speed_order": self.speed_order,
            "choice": self.choice.row() if self.choice else None,
            "estimates": [e.row() for e in self.estimates],
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Machine:
    gpus: int = 1
    gpu_mem_gb: float = 80.0
    gpus_per_node: int = 8
    device: str = "cuda"  # cuda | cpu (the CPU runs plain torch in fp32: what `solopo train` does there)
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu (train.dtype)
    fused_adam: bool = False  # torch AdamW(fused=True) keeps no step temporaries (bench/train on CUDA)
    # What the allocator holds beyond the live tensors of the step's changing part (activations, gradients in
    # flight): 1.0 on the CPU (glibc returns large blocks to the OS on free; bench/plan measures RSS within 6%);
    # on CUDA the caching allocator's block rounding and fragmentation, fitted to the two committed H200 points
    # (Qwen2.5-7B shape: solo 61,440 and long 28,672 fit an 80 GiB cap; both give 1.19-1.20; bench/plan)
    alloc_factor: float | None = None

    @property
    def factor(self) -> float:
        if self.alloc_factor is not None:
            return self.alloc_factor
        return CUDA_ALLOC_FACTOR if self.device == "cuda" else 1.0

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


def _ds_numbers(zero: str) -> dict[str, float]:
    from solopo.resources import resource_text

    z = json.loads(resource_text("training", "ds_configs", f"{zero}.json"))["zero_optimization"]
    return {
        "reduce_bucket": float(z.get("reduce_bucket_size", 5e8)),
        "allgather_bucket": float(z.get("allgather_bucket_size", 5e8)),
        "prefetch": float(z.get("stage3_prefetch_bucket_size", 5e7)),
    }


@dataclass
class Parts:
    """Bytes per rank: what is there all the time, what the forward+backward adds at its peak, and what the
    optimizer update adds (gradients and the update's temporaries)."""

    weights: float
    optimizer: float
    host: float  # CPU memory per node for what is offloaded
    fb_grads: float
    activations: float
    logits: float
    step_grads: float

    @property
    def fb(self) -> float:
        return self.weights + self.optimizer + self.fb_grads + self.activations + self.logits

    @property
    def step(self) -> float:
        return self.weights + self.optimizer + self.step_grads

    @property
    def total(self) -> float:
        return max(self.fb, self.step)


def estimate(
    facts: ModelFacts, combo: Combo, machine: Machine, trace: Trace, lora_r: int = 16, two_forwards: bool = False
) -> Parts:
    """Per-rank bytes of `combo` on `machine`, with the traced forward+backward of one rank. `two_forwards`: the
    step runs the model twice before backward (solo: the pair, then x_long), so weight gradients wait in
    autograd's buffers for the second contribution, under DeepSpeed as in plain torch (its hooks see a gradient
    once it is accumulated)."""
    b = torch.tensor([], dtype=machine.torch_dtype).element_size()
    n = max(1, machine.gpus)
    P = facts.params
    lora = combo.peft in ("lora", "qlora")
    T = facts.lora_params(lora_r) if lora else P  # trainable parameters
    # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype), except LoRA under ZeRO-3, where training.peft.wrap
    # keeps the base dtype (ZeRO-3 shards parameters of one dtype)
    tb = b if combo.peft == "lora" and combo.zero == "zero3" else 4 if lora else b
    base_b = 0.5 if combo.peft == "qlora" else b  # 4-bit NF4 base
    k = machine.factor
    logits = min(trace.logits, trace.activations)  # the head chunk's own peak, when it is part of the step's
    act = trace.activations - logits
    per_node = min(n, machine.gpus_per_node)
    in_flight = trace.grads_at_peak * (T * tb) / max(1, P * b) * k  # gradients alive at the traced peak
    if combo.zero == "none":
        # backward's live gradients as traced (plain torch keeps each one once produced); at the update all T of
        # them plus the update's temporaries: foreach AdamW on CUDA makes one full-size copy (the sqrt of
        # exp_avg_sq), the several-rank gradient average one flat buffer; single-tensor AdamW (CPU) next to none
        temp = 0 if (machine.device == "cpu" or machine.fused_adam) and n == 1 else T * tb
        return Parts(
            weights=P * base_b + (T * tb if lora else 0),
            optimizer=2 * T * tb,  # torch AdamW: exp_avg, exp_avg_sq in the parameter dtype
            host=0.0,
            fb_grads=in_flight,
            activations=act * k,
            logits=logits * k,
            step_grads=T * tb + temp,
        )
    ds = _ds_numbers(combo.zero)
    master = 12 * T / n  # fp32 master weights + Adam exp_avg + exp_avg_sq, sharded over all ranks
    bucket = min(ds["reduce_bucket"], T) * tb
    grads = 4 * T / n + 2 * bucket  # fp32 gradient partition + double-buffered reduce bucket
    if combo.zero == "zero2":
        weights = P * base_b + (T * tb if lora else 0)
    else:
        # ZeRO-3: this rank's shard, plus the gathered working set (the biggest layer or the embedding/head, and
        # the prefetch bucket)
        shard = 0 if combo.offload == "full" else P * base_b / n
        weights = shard + (facts.largest_module + ds["prefetch"]) * base_b
    optimizer, host = master, 0.0
    if combo.offload in ("optimizer", "full"):
        host += (master + 4 * T / n) * per_node
        optimizer, grads = 0.0, 2 * bucket + T * tb / n  # the bf16 partition kept for the copy
    if combo.offload == "full":
        host += P * base_b / n * per_node
    # accumulated gradients are reduced and freed bucket by bucket; buffered ones (two forwards) are not
    return Parts(weights, optimizer, host, grads + (in_flight if two_forwards else 0), act * k, logits * k, grads)


# --- the plan -----------------------------------------------------------------------------------------------------
def combos(facts: ModelFacts, machine: Machine, peft_options: list[str], sp_options: list[int]) -> list[Combo]:
    out = []
    zeros = SPEED_ORDER if machine.device == "cuda" else (("none", "none"),)
    for peft in peft_options:
        for sp in sp_options:
            for zero, off in zeros:
                if sp > 1 and zero == "none":
                    continue  # Ulysses runs through DeepSpeed's engine (ZeRO-2/3)
                out.append(Combo(zero, off, sp, peft))
    return out


SEARCH_SPAN = 8  # the max-length search looks up to 8x the target length (at least 128K); the table says ">="


def _max_len(fb_of, step: float, budget: float, start: int, limit: int) -> int:
    """The largest long length (multiple of 1024) whose peak fits `budget`. The forward+backward peak is linear in
    the length between the points where its place in backward moves (the start of backward, activations at
    their highest, or its end, every gradient alive), so: double or halve from `start` until the budget is
    bracketed, then interpolate inside the bracket. `fb_of(L)` is the traced peak at L; the update's (`step`)
    does not depend on L."""
    if step > budget:
        return 0
    L, f = start, fb_of(start)
    if f <= budget:
        while f <= budget:
            if L >= limit:
                return limit
            lo, f_lo = L, f
            L = min(2 * L, limit)
            f = fb_of(L)
        hi, f_hi = L, f
    else:
        while f > budget:
            if L <= 1024:
                return 0
            hi, f_hi = L, f
            L = max(1024, L // 2)
            f = fb_of(L)
        lo, f_lo = L, f
    x = lo + (budget - f_lo) / max(f_hi - f_lo, 1e-9) * (hi - lo)
    return max(0, int(min(x, hi) // 1024) * 1024)


def make_plan(
    facts: ModelFacts,
    shape: RunShape,
    machine: Machine,
    margin: float = DEFAULT_MARGIN,
    peft_options: list[str] | None = None,
    sp_options: list[int] | None = None,
    lora_r: int = 16,
    only: list[Combo] | None = None,
    notes: list[str] | None = None,
    search: bool = True,
) -> Plan:
    """Every feasible combination's per-rank peak at `shape`, its longest long length, and the fastest that fits."""
    notes = list(notes or [])
    dtype = machine.torch_dtype
    budget = machine.gpu_mem_gb * GIB * (1 - margin)
    valid = valid_sp_sizes(facts, machine.gpus) if machine.device == "cuda" else [1]
    sp_opts = [s for s in (sp_options or valid) if s in valid] or [1]
    cands = only or combos(facts, machine, peft_options or ["none"], sp_opts)
    if shape.has_long and facts.max_positions and shape.long_len + shape.completion > facts.max_positions:
        notes.append(
            f"{shape.long_len} + {shape.completion} tokens exceed the model's max_position_embeddings "
            f"({facts.max_positions}): extend its context (rope scaling) before training that long"
        )
    two = shape.mode == "solo"  # two forwards before backward: the pair, then x_long
    out = []
    for c in cands:
        parts = estimate(facts, c, machine, trace_step(facts, shape, dtype, c.sp), lora_r, two)
        max_len, limit = None, 0
        if shape.has_long and search:

            def fb_of(L: int, c: Combo = c) -> float:
                tr = trace_step(facts, replace(shape, long_len=L), dtype, c.sp)
                return estimate(facts, c, machine, tr, lora_r, two).fb

            start = max(1024, shape.long_len // 1024 * 1024)
            limit = max(SEARCH_SPAN * start, 131072)
            max_len = _max_len(fb_of, parts.step, budget, start, limit)
        at_fb = parts.fb >= parts.step
        out.append(
            Estimate(
                combo=c,
                weights=parts.weights / GIB,
                gradients=(parts.fb_grads if at_fb else parts.step_grads) / GIB,
                optimizer=parts.optimizer / GIB,
                activations=(parts.activations if at_fb else 0.0) / GIB,
                logits=(parts.logits if at_fb else 0.0) / GIB,
                total=parts.total / GIB,
                host_gb=parts.host / GIB,
                fits=parts.total <= budget,
                max_len=max_len,
                max_len_capped=max_len == limit,
            )
        )
    choice = next((e for e in out if e.fits), None)
    return Plan(
        model=facts.name,
        params=facts.params,
        gpus=machine.gpus,
        gpu_mem_gb=machine.gpu_mem_gb,
        margin=margin,
        dtype=str(dtype).removeprefix("torch."),
        shape=shape,
        sp_constraint=sp_constraint(facts),
        valid_sp=valid,
        estimates=out,
        choice=choice,
        speed_order=speed_order_text(),
        notes=notes,
    )


def speed_order_text() -> str:
    order = " < ".join(
        {"none": "plain", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}[z] + ("" if o == "none" else f"+offload {o}")
        for z, o in SPEED_ORDER
    )
    return f"fastest first: sp 1 < 2 < 4 ...; full fine-tuning before LoRA; then {order}"


# --- output -------------------------------------------------------------------------------------------------------
def format_table(plan: Plan) -> str:
    s = plan.shape
    lengths = (
        f"short {s.short_len} / long {s.long_len} / completion {s.completion}"
        if s.mode == "solo"
        else f"prompt {s.long_len if s.has_long else s.short_len} / completion {s.completion}"
    )
    lines = [
        f"{plan.model}: {plan.params / 1e9:.2f}B parameters, {plan.dtype}; {plan.gpus} GPU(s) x {plan.gpu_mem_gb:g} "
        f"GiB, budget {plan.gpu_mem_gb * (1 - plan.margin):.1f} GiB per rank (margin {plan.margin:.0%})",
        f"{s.algo}-{s.mode}, micro batch {s.micro_batch}, {lengths} tokens, gradient checkpointing "
        f"{'on' if s.gradient_checkpointing else 'off'}, logps_chunk {s.logps_chunk}"
        + (", shared prefix" if s.shared_prefix else ""),
        f"sp_size: {plan.sp_constraint}; valid here: {', '.join(map(str, plan.valid_sp))}",
        "",
        f"{'setting':<24} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'logits':>7} {'total':>8}  "
        f"{'fits':<4} {'max long':>9} {'host/node':>9}",
    ]
    for e in plan.estimates:
        mark = "*" if e is plan.choice else " "
        ml = "-" if e.max_len is None else (">=" if e.max_len_capped else "") + f"{e.max_len:,}"
        lines.append(
            f"{mark}{e.combo.label:<23} {e.weights:>8.1f} {e.gradients:>8.1f} {e.optimizer:>8.1f} "
            f"{e.activations:>8.1f} {e.logits:>7.2f} {e.total:>8.1f}  {'yes' if e.fits else 'no':<4} {ml:>9} "
            f"{e.host_gb:>9.0f}"
        )
    lines.append("")
    lines.append("GiB per rank at the step's peak; max long = longest long prompt that fits the budget.")
    lines.append(f"Speed order assumed: {plan.speed_order}.")
    if plan.choice:
        lines.append(f"Recommended (*): {plan.choice.combo.label} - {settings_text(plan.choice.combo)}")
    else:
        tried_lora = any(e.combo.peft != "none" for e in plan.estimates)
        lines.append(
            "Nothing fits: shorten train.target_len or add GPUs (more ranks allow a larger sp_size)"
            + ("." if tried_lora else ", or use LoRA (--peft lora).")
        )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def settings_text(c: Combo) -> str:
    sets = [f"train.deepspeed={c.zero}"]
    if c.offload != "none":
        sets.append(f"train.offload={c.offload}")
    if c.sp > 1:
        sets.append(f"train.sp_size={c.sp}")
    if c.peft != "none":
        sets.append(f"train.peft={c.peft}")
    return " ".join(f"--set {s}" for s in sets)


def emit(plan: Plan, out_dir: Path, model: str | None, train_cfg: Any) -> list[Path]:
    """The launcher files for the plan's choice: ds_config.json (build_ds_config), a hostfile template and the
    `solopo train` command line."""
    from solopo.pipeline.io import write_json, write_text
    from solopo.training.loop.settings import build_ds_config

    if plan.choice is None:
        raise PlanError("nothing fits, so there is nothing to emit; see the table")
    c = plan.choice.combo
    out_dir = Path(out_dir)
    files = []
    cfg = train_cfg.model_copy(update={"deepspeed": c.zero, "offload": c.offload, "sp_size": c.sp, "peft": c.peft})
    if c.zero != "none":
        ds = build_ds_config(cfg, torch.bfloat16 if plan.dtype == "bfloat16" else torch.float32, plan.gpus)
        files.append(out_dir / "ds_config.json")
        write_json(ds, files[-1])
    nodes = max(1, math.ceil(plan.gpus / 8))
    per = min(8, plan.gpus)
    hosts = "".join(f"node{i + 1} slots={per}\n" for i in range(nodes))
    files.append(out_dir / "hostfile")
    write_text(
        f"# one line per node: its hostname and GPUs (slots); passwordless ssh from the first to all\n{hosts}",
        files[-1],
    )
    cmd = ["solopo", "train"]
    if model:
        cmd += ["--model", model]
    cmd += ["--algo", plan.shape.algo, "--mode", plan.shape.mode, *settings_text(c).split()]
    if nodes > 1:
        cmd += ["--set", f"train.hostfile={out_dir / 'hostfile'}"]
    else:
        cmd += ["--set", f"train.num_processes={plan.gpus}"]
    files.append(out_dir / "train_command.sh")
    write_text("#!/bin/sh\n" + " ".join(cmd) + "\n", files[-1])
    return files


# --- from a run's config: the CLI and the pre-launch check --------------------------------------------------------
def run_settings(train_cfg: Any) -> tuple[int, str, int]:
    """(sp_size, peft, lora r) of a train config; sp_size=auto reads as 1 here (the plan then lists every valid
    sp, and prelaunch_check chooses among them)."""
    lora = getattr(train_cfg, "lora", None)
    return train_cfg.sp_planned, getattr(train_cfg, "peft", "none"), int(getattr(lora, "r", 16) or 16)


def plan_for_config(
    train_cfg: Any,
    model: str | None,
    long_len: int,
    machine: Machine,
    short_len: int = 1024,
    completion: int = 1024,
    margin: float = DEFAULT_MARGIN,
    facts: ModelFacts | None = None,
) -> Plan:
    """`solopo plan`: every setting for this run's train config on `machine` (LoRA rows beside full fine-tuning;
    every valid sp unless train.sp_size is a number)."""
    facts = facts or load_model_facts(model)
    sp, peft, r = run_settings(train_cfg)
    shape = RunShape.from_train_config(train_cfg, long_len, short_len, completion)
    sp_opts = None
    if sp > 1:  # the trainer's own check: heads and ranks divisible by it (ConfigError naming the valid sizes)
        from solopo.training.seq_parallel import check_sp

        check_sp(train_cfg, facts.path, machine.gpus)
        sp_opts = [sp]
    pefts = [peft] + (["lora"] if peft == "none" else [])
    return make_plan(facts, shape, machine, margin, peft_options=pefts, sp_options=sp_opts, lora_r=r)


def _lengths_from_data(table: Any, target_len: int | None) -> tuple[int, int, int] | None:
    """(short prompt, long prompt, completion) tokens: the longest of the rows train will read, plus the chat
    template's tokens around them."""
    need = {"short_tokens", "long_tokens", "chosen_tokens", "rejected_tokens"}
    if table is None or table.num_rows == 0 or not need <= set(table.column_names):
        return None
    rows = table.to_pylist()
    if "target_len" in table.column_names:
        lens = sorted({r["target_len"] for r in rows if r["target_len"] is not None})
        pick = target_len if target_len in lens else (lens[-1] if lens else None)
        rows = [r for r in rows if r.get("target_len") == pick] or rows

    def top(k: str) -> int:
        return max(int(r[k] or 0) for r in rows) + TEMPLATE_TOKENS

    return top("short_tokens"), top("long_tokens"), max(top("chosen_tokens"), top("rejected_tokens"))


def _stages_for(train_cfg: Any, sp: int, cuda: bool) -> list[str]:
    """The ZeRO stages train may run with at this sp: the configured one, or deepspeed=auto's candidates (on a GPU
    the plan chooses among them; on a CPU what the loop picks: plain torch, ZeRO-2 for sp > 1, ZeRO-3 to offload)."""
    if train_cfg.deepspeed != "auto":
        return [train_cfg.deepspeed]
    if cuda:
        return [z for z, o in SPEED_ORDER if o == train_cfg.offload and not (sp > 1 and z == "none")]
    if train_cfg.offload != "none":
        return ["zero3"]
    return ["zero2" if sp > 1 else "none"]


def _sp_options(train_cfg: Any, facts: ModelFacts, world: int) -> list[int]:
    """train.sp_size=auto: the sizes ALST accepts for these heads that divide the ranks, smallest (fastest) first;
    only 1 where the config rules sequence parallelism out (deepspeed=none, eager attention)."""
    if train_cfg.deepspeed == "none" or train_cfg.attn == "eager":
        return [1]
    return valid_sp_sizes(facts, world)


def prelaunch_check(train_cfg: Any, model: str | None, table: Any, gpus: int, note, stat) -> Any:
    """Before the model loads: refuse (PlanError, exit 2, with the table) a setting the plan says cannot fit, and
    turn train.deepspeed=auto (on a GPU) and train.sp_size=auto into the fastest setting that fits: the smallest sp,
    then the fastest ZeRO stage. Returns the config to train with (sp_size always a number).
    Skipped, with a note, under train.skip_plan=true and on a CPU unless train.gpu_mem_gb is given; sp_size=auto is
    then 1, said in a note."""
    sp_auto = train_cfg.sp_size == "auto"

    def unplanned(why: str) -> Any:
        note(f"memory plan not checked{why}")
        if not sp_auto:
            return train_cfg
        note("train.sp_size=auto -> 1 (no memory plan to choose by; set train.gpu_mem_gb, or a number)")
        stat("sp_size", 1)
        return train_cfg.model_copy(update={"sp_size": 1})

    if getattr(train_cfg, "skip_plan", False):
        return unplanned(" (train.skip_plan=true)")
    cuda = torch.cuda.is_available()
    mem = getattr(train_cfg, "gpu_mem_gb", None)
    if mem is None and cuda:
        mem = torch.cuda.get_device_properties(0).total_memory / GIB
    if mem is None:
        return unplanned(": no GPU, and train.gpu_mem_gb is not set")
    lengths = _lengths_from_data(table, train_cfg.target_len)
    if lengths is None:
        return unplanned(": the export has no token counts")
    short, long_len, comp = lengths
    machine = Machine(gpus=gpus, gpu_mem_gb=float(mem), device="cuda" if cuda else "cpu", dtype=train_cfg.dtype)
    _, peft, r = run_settings(train_cfg)
    facts = load_model_facts(model)
    if sp_auto:
        sps = _sp_options(train_cfg, facts, gpus)
    else:
        sps = [train_cfg.sp_size]
        if train_cfg.sp_size > 1:  # before the trainer's own, which would come after this plan
            from solopo.training.seq_parallel import check_sp

            check_sp(train_cfg, facts.path, gpus)
    shape = RunShape.from_train_config(train_cfg, long_len, short, comp)
    cands = [Combo(z, train_cfg.offload, sp, peft) for sp in sps for z in _stages_for(train_cfg, sp, cuda)]
    plan = make_plan(facts, shape, machine, only=cands, lora_r=r, search=False)
    if plan.choice is None:
        plan = make_plan(facts, shape, machine, only=cands, lora_r=r)  # with the longest length that fits
        raise PlanError(
            f"train: the memory plan says this run does not fit {mem:g} GiB per GPU "
            f"(train.target_len {long_len - TEMPLATE_TOKENS} tokens as exported):\n{format_table(plan)}\n"
            "Choose a setting that fits (`solopo plan` lists them all), train on shorter contexts, or add "
            "`--set train.skip_plan=true` to launch anyway"
        )
    c = plan.choice
    stat("plan_peak_gb", round(c.total, 2))
    stat("plan_setting", c.combo.label)
    update: dict[str, Any] = {}
    fit = f"memory plan: {c.total:.1f} GiB per rank of {mem:g}"
    if sp_auto:
        tried = ", ".join(str(s) for s in sps)
        note(f"train.sp_size=auto -> {c.combo.sp} ({fit}; smallest that fits of {tried} on {gpus} rank(s))")
        stat("sp_size", c.combo.sp)
        update["sp_size"] = c.combo.sp
    if train_cfg.deepspeed == "auto" and cuda:
        note(f"train.deepspeed=auto -> {c.combo.zero} ({fit}; fastest that fits)")
        update["deepspeed"] = c.combo.zero
    if not update:
        note(f"memory plan: {c.combo.label} needs {c.total:.1f} GiB per rank of {mem:g}")
    return train_cfg.model_copy(update=update) if update else train_cfg
