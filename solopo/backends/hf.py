"""The transformers fallback: batched `generate` with a per-row seeded sampler, so that a prompt's samples depend on
its seed alone, never on its batch neighbours."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

from solopo.backends import (
    Generation,
    ProgressFn,
    _ChatBackend,
    _seeds,
)
from solopo.chat import ChatFormat
from solopo.pipeline.errors import SolopoError

log = logging.getLogger("solopo")


class TransformersBackend(_ChatBackend):
    """Batched `model.generate` with left padding; several prompts x n samples per call.

    prefill="shared" (auto on CPU): each prompt is prefilled once and its KV cache repeated for its n samples
    (n times less prompt compute, what a CPU is short of). prefill="batched" (auto on CUDA): prompts x n rows go
    to `generate` as they are, one call filling batch_size (a GPU prefills the copies in parallel and skips the
    extra forward and cache copy). Both draw the same samples: sampling is seeded per row (see _SeededSampler).
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
        reproducible: bool = False,
        chat: ChatFormat | None = None,
        **_: Any,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.chat = chat or ChatFormat()

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
        if dtype == "auto" and reproducible:
            torch_dtype = torch.float32  # bf16 logits depend on the batch (issue 22: 10/12 samples alone vs batched)
        elif dtype == "auto":
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
        self.dtype = self.effective_dtype = str(torch_dtype).removeprefix("torch.")
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
        ids = [self.chat.prompt_ids(self.tokenizer, p) for p in prompts]
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
            # Greedy decoding throughout: sampling is a seeded inverse-CDF draw from the tempered, top-p-filtered
            # softmax (_SeededSampler), which generate's argmax then emits; no global RNG is involved.
            gen_kw: dict[str, Any] = dict(
                max_new_tokens=max_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            guard = _RowGuard(len(group) * n_gen)  # counts rows whose logits are NaN/inf (a broken checkpoint)
            procs: list[Any] = [guard]
            if not greedy:
                procs.append(TemperatureLogitsWarper(temperature))
                if top_p < 1.0:
                    procs.append(TopPLogitsWarper(top_p))
                keys = [sample_key(seeds[i], j) for i in group for j in range(n_gen)]  # rows in output order
                procs.append(_SeededSampler(keys, prompt_width=width, device=self.device))
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
                    r = row * n_gen + (j if n_gen > 1 else 0)
                    seq = new[r].tolist()
                    stop_at = next((k for k, t in enumerate(seq) if t in self.eos_ids), None)
                    if stop_at is None:
                        body, reason, count = seq, "length", len(seq)
                    else:
                        body, reason, count = seq[:stop_at], "stop", stop_at + 1
                    text = self.tokenizer.decode(body, skip_special_tokens=True)
                    finite = not bool(guard.nonfinite_rows[r])
                    gens.append(Generation(text=text, finish_reason=reason, num_tokens=count, finite=finite))
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


class _RowGuard:
    """A logits processor that flags rows with non-finite scores (NaN/inf logits, every token filtered) and
    replaces them with zeros, so that greedy argmax and the sampler never read NaN; the backend reports them."""

    def __init__(self, rows: int):
        import torch

        self.nonfinite_rows = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        bad = ~torch.isfinite(scores.amax(-1))  # NaN propagates through amax; all -inf -> -inf; +inf overflow
        if not bad.any():
            return scores
        self.nonfinite_rows |= bad.cpu()
        return torch.where(bad[:, None], 0.0, scores)


class _SeededSampler:
    """A logits processor that turns greedy decoding into seeded sampling, one random stream per row.

    Inverse-CDF sampling: one uniform u in [0, 1) per (row, decode step), from a counter-based hash of (row key,
    step), picks the token whose cumulative probability interval holds u * total mass (float64 softmax and
    cumsum). A token of probability 0 (a -inf score: top-p filtered) has an empty interval and can never be
    drawn. A row's draws do not depend on which rows share its batch, on the batch size, on how the prompt was
    prefilled, or on torch's global RNG (which another library may reseed).

    Returns scores that are 0 at the drawn token and -inf elsewhere, so generate's argmax emits it. Scores must be
    finite somewhere in each row (_RowGuard runs first).

    Why not Gumbel-max: argmax(scores + Gumbel noise) needs one uniform per token (49K per row and step for
    SmolLM2), which cost ~0.15 s per decode step of 32 rows on 2 cores, and its float32 uniforms rounded to
    1.0 (noise +inf) in 0.29% of row-steps, emitting filtered tokens (issue 22).
    """

    def __init__(self, keys: list[int], prompt_width: int, device: Any):
        import torch

        self.keys = torch.tensor(keys, dtype=torch.long, device=device)  # (rows,)
        self.width = prompt_width

    def uniforms(self, step: int) -> Any:
        """u in [0, 1) per row for one decode step: 52 hash bits / 2^52 (exact in float64, never 1.0)."""
        import torch

        z = _mix64_t(self.keys + _signed(step * _C1))  # (rows,)
        return ((z >> 12) & ((1 << 52) - 1)).to(torch.float64) / float(1 << 52)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.width  # 0 for the first generated token
        p = torch.softmax(scores, dim=-1, dtype=torch.float64)  # float64: cumsum error ~1e-12 over 49K tokens
        idx = inverse_cdf(p, self.uniforms(step))  # (rows,)
        out = torch.full_like(scores, -torch.inf)
        return out.scatter_(-1, idx[:, None], 0.0)


def inverse_cdf(p: Any, u: Any) -> Any:
    """Token index per uniform: the first token whose cumulative probability exceeds u * total mass.

    p: (rows, vocab) with u: (rows,), one draw per row; or p: (vocab,) with u: (draws,), many draws from one
    distribution. A token of probability 0 has an empty interval (its cdf equals its predecessor's) and is never
    returned; a target that rounds up to the total mass returns the last token of nonzero probability.
    """
    import torch

    cdf = p.cumsum(-1)
    target = u * cdf[..., -1]
    if p.dim() == 2:
        idx = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    else:
        idx = torch.searchsorted(cdf, target, right=True)
    over = idx >= p.shape[-1]
    if over.any():
        pos = torch.arange(p.shape[-1], device=p.device)
        idx = torch.where(over, torch.where(p > 0, pos, -1).amax(-1), idx)
    return idx
