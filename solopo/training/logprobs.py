"""Per-sequence completion log-probs without full-vocabulary logits over the prompt.

The decoder runs to hidden states; only the positions that predict a target token are gathered, and the
LM head is applied to them in chunks, each under activation checkpointing, so at most
`chunk_size x vocab` logits exist at a time, in the forward and in the backward pass.

No (b, 1, s, s) mask is built on the fast paths: a right-padded batch needs none (causal attention never lets a
real token see the pads that follow it), and a shared-prefix packed row [prompt, chosen, rejected] is attended as
segments (`segment_sdpa`): one causal call over [prompt, chosen] and one lower-right-causal call of the rejected
answer over [prompt, rejected], both kernels that never materialize the mask on CUDA (flash / memory-efficient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from .losses import SeqLogps
from .seq_parallel import SeqParallel

SEGMENT_ATTN = "solopo_segment_sdpa"  # attention implementation name registered with transformers


class Targets(NamedTuple):
    """Where the targets are, computed on the host at collation (no nonzero()/any() device sync per forward).
    bi, ti (n,): row and position of each target token; pi (n,): the position whose hidden state predicts it;
    sel (k, n) float: 1 where target n belongs to mask k (e.g. completion, all tokens)."""

    bi: torch.Tensor
    ti: torch.Tensor
    pi: torch.Tensor
    sel: torch.Tensor


def targets_from_masks(masks: list[torch.Tensor], pred_index: torch.Tensor | None = None) -> Targets:
    """(b, s) bool masks (True = target; never position 0) -> Targets. Run it where the masks live (the host)."""
    union = torch.zeros_like(masks[0])
    for m in masks:
        union = union | m
    if bool(union[:, 0].any()):
        raise ValueError("position 0 cannot be a target: no position predicts it")
    bi, ti = union.nonzero(as_tuple=True)  # (n,), (n,)
    pi = ti - 1 if pred_index is None else pred_index[bi, ti]  # (n,)
    sel = torch.stack([m[bi, ti] for m in masks]).float()  # (k, n)
    return Targets(bi, ti, pi, sel)


def shared_prefix_dense_mask(segments: list[tuple[int, int, int]], s: int) -> torch.Tensor:
    """The (b, 1, s, s) bool mask (True = may attend) equal to `segment_sdpa` for rows [P prefix, W, L] + pads:
    [prefix, chosen] causal; rejected sees the prefix and itself causally; pads see themselves only. O(s^2): the
    reference for eager attention and for tests."""
    b = len(segments)
    attn = torch.eye(s, dtype=torch.bool).repeat(b, 1, 1, 1)  # pads attend to themselves only (no empty rows)
    causal = torch.ones((s, s), dtype=torch.bool).tril()
    for i, (P, W, L) in enumerate(segments):
        a, n = P + W, P + W + L
        attn[i, 0, :a, :a] = causal[:a, :a]
        attn[i, 0, a:n, :P] = True  # rejected -> prefix
        attn[i, 0, a:n, a:n] = causal[:L, :L]  # rejected -> itself, causally
    return attn


def segment_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segments: list[tuple[int, int, int]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: plain sdpa unless `segments` (one (P, W, L) per row) is passed through
    the decoder's kwargs. query (b, h, s, d), key/value (b, kv_heads, s, d) -> (b, s, h, d)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    from torch.nn.attention.bias import causal_lower_right

    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (b, h, s, d)
    rows = []
    for i, (P, W, L) in enumerate(segments):
        a, n = P + W, P + W + L
        q, k, v = query[i : i + 1], key[i : i + 1], value[i : i + 1]  # (1, h, s, d)
        o1 = F.scaled_dot_product_attention(
            q[:, :, :a], k[:, :, :a], v[:, :, :a], is_causal=True, dropout_p=dropout, scale=scaling
        )  # (1, h, a, d): prefix + chosen
        k2 = torch.cat([k[:, :, :P], k[:, :, a:n]], dim=2)  # (1, h, P + L, d)
        v2 = torch.cat([v[:, :, :P], v[:, :, a:n]], dim=2)
        # rejected query j sees the prefix and rejected[:j+1]: causal aligned to the bottom-right corner
        o2 = F.scaled_dot_product_attention(
            q[:, :, a:n], k2, v2, attn_mask=causal_lower_right(L, P + L), dropout_p=dropout, scale=scaling
        )  # (1, h, L, d)
        rows.append(torch.cat([o1, o2, v[:, :, n:]], dim=2))  # pads: attend to themselves only (= own value)
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _segment_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask builder for SEGMENT_ATTN: no mask when none is given (causal; segment rows carry their own pattern).
    Without this, transformers reads the shared-prefix row's restarting position_ids as packed sequences and builds
    a dense (b, 1, s, s) mask that segment_sdpa would not even use."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_segment_attention() -> None:
    """Make SEGMENT_ATTN a valid `attn_implementation` (sdpa when no segments are given)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTN, segment_sdpa)
    AttentionMaskInterface.register(SEGMENT_ATTN, _segment_mask)


def use_segment_attention(lm: nn.Module) -> bool:
    """Switch an sdpa model to the segment attention (identical without segments). False when it is not sdpa
    (eager keeps the dense mask; flash-attn has no custom masks)."""
    if getattr(lm.config, "_attn_implementation", None) not in ("sdpa", SEGMENT_ATTN):
        return False
    register_segment_attention()
    lm.set_attn_implementation(SEGMENT_ATTN)
    return True


def _token_logps(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = lm_head(hidden).float()  # (n, v)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (n,)
    return picked - torch.logsumexp(logits, dim=-1)


def num_chunks(n: int, chunk_size: int) -> int:
    return -(-n // chunk_size)


def chunked_token_logps(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
    min_chunks: int = 0,
    reentrant: bool = False,
) -> torch.Tensor:
    """log softmax(lm_head(hidden))[labels] for (n, d) hidden states, `chunk_size` rows at a time.

    `min_chunks` pads with empty chunks so that lm_head is called (forward, and recomputed in backward) at least
    that many times: under ZeRO-3 every call gathers the head's weights collectively, so all ranks must make the
    same number of calls. `reentrant`: checkpoint reentrantly (a frozen head under ZeRO-3, e.g. LoRA: the
    non-reentrant recompute sees the head's released partition)."""
    out = []
    for c in range(max(num_chunks(hidden.shape[0], chunk_size), min_chunks)):
        start = c * chunk_size  # past the end for padding chunks: an empty (0, d) slice, still in the graph
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            # Recompute the chunk's logits in backward instead of keeping (chunk, vocab) floats alive.
            out.append(checkpoint(_token_logps, lm_head, h, y, softcap, use_reentrant=reentrant))
        else:
            out.append(_token_logps(lm_head, h, y, softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class CompletionLogps(nn.Module):
    """Wraps a causal LM so that one forward returns per-sequence target log-prob sums.

    Being a module (not a function over the model) matters under DeepSpeed ZeRO-3: the engine wraps this
    module, and the parameter-gathering hooks fire for the decoder and the LM head as they are called.
    """

    def __init__(
        self,
        lm: nn.Module,
        chunk_size: int = 1024,
        sync_chunks: bool = False,
        reentrant_head: bool = False,
        sp: SeqParallel | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.sp = sp or SeqParallel()  # train.sp_size > 1: each rank runs its slice of every row
        self.chunk_size = chunk_size
        # ZeRO-3 with several ranks: agree on the LM-head chunk count (all-reduce MAX) before calling the head.
        self.sync_chunks = sync_chunks
        self.reentrant_head = reentrant_head  # see chunked_token_logps
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        target_masks: list[torch.Tensor] | Targets,
        position_ids: torch.Tensor | None = None,
        pred_index: torch.Tensor | None = None,
        segments: list[tuple[int, int, int]] | None = None,
    ) -> list[SeqLogps]:
        """input_ids (b, s), right-padded; target_masks: (b, s) bool, True where the token is a target (never
        position 0), or the same as precomputed `Targets` (no device sync). attention_mask: None (right padding
        needs none), a (b, s) padding mask, or a (b, 1, s, s) custom bool mask. Shared-prefix rows: `segments`
        (P, W, L) per row with their position_ids and pred_index (b, s): which position predicts each token
        (default t-1); attended as segments under SEGMENT_ATTN, else through the dense mask (eager).

        Returns one SeqLogps per mask (e.g. completion tokens, and all tokens for ORPO's sequence NLL)."""
        decoder = getattr(self.lm, self.lm.base_model_prefix)
        lm_head = self.lm.get_output_embeddings()
        impl = getattr(self.lm.config, "_attn_implementation", "sdpa")
        extra = {}
        if segments is not None:
            if impl == SEGMENT_ATTN:
                extra["segments"] = segments  # reaches segment_sdpa through the decoder layers' kwargs
            else:
                attention_mask = shared_prefix_dense_mask(segments, input_ids.shape[1]).to(input_ids.device)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            if impl not in ("sdpa", "eager", SEGMENT_ATTN):
                raise ValueError(f"a custom (shared-prefix) attention mask needs sdpa or eager attention, not {impl}")
            # an additive mask works for both (eager adds it to the scores; a bool one would be added as 0/1)
            dtype = next(self.lm.parameters()).dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
                ~attention_mask, torch.finfo(dtype).min
            )
        t = target_masks if isinstance(target_masks, Targets) else targets_from_masks(target_masks, pred_index)
        b = input_ids.shape[0]
        full = t  # every target counts, whichever SP rank computes its log-prob
        with record_function("solopo.decoder"):  # transformers' own code (bench/train profiles it apart)
            if self.sp.on:
                hidden, t = self._decode_slice(decoder, input_ids, attention_mask, position_ids, t, segments)
            else:
                hidden = decoder(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                    **extra,
                ).last_hidden_state  # (b, s, d)
        h = hidden[t.bi, t.pi]  # (n, d): only the positions that predict a target
        labels = input_ids[t.bi, t.ti]  # (n,): from the full row, i.e. shifted before any sharding
        # Under SP at least one (maybe empty) head call: every rank's loss must reach its decoder, whose backward
        # holds the all-to-all collectives of the other ranks.
        chunks = max(self._agreed_chunks(h.shape[0], h.device), int(self.sp.on))
        tok = chunked_token_logps(
            lm_head, h, labels, self.chunk_size, self.softcap, chunks, self.reentrant_head
        )  # (n,)
        out = []
        for sel, full_sel in zip(t.sel.to(tok.dtype), full.sel.to(tok.dtype), strict=True):  # (n,) per mask
            total = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, t.bi, tok * sel)  # (b,)
            count = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, full.bi, full_sel)  # (b,)
            out.append(SeqLogps(total=self.sp.sum(total), count=count))  # SP: this rank's part, summed over the group
        return out

    def _decode_slice(self, decoder, input_ids, attention_mask, position_ids, t: Targets, segments):
        """SP: this rank's slice of every row through the decoder (ALST gathers the full sequence per attention
        layer), one row per call (ALST's micro batch is 1). Returns the hidden states (b, s_pad / sp, d) and the
        targets this slice predicts, with positions relative to the slice."""
        if attention_mask is not None:
            raise ValueError("sequence parallelism attends by position_ids: no attention mask (eager) is supported")
        b, s = input_ids.shape
        padded, lo, hi = self.sp.bounds(s)
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        if padded > s:  # pads after the last token, positions continuing (sdpa attends causally by order)
            extra_pos = position_ids[:, -1:] + torch.arange(1, padded - s + 1, device=input_ids.device)
            position_ids = torch.cat([position_ids, extra_pos], dim=1)
            input_ids = torch.cat([input_ids, input_ids.new_zeros(b, padded - s)], dim=1)
        rows = []
        for i in range(b):
            extra = {"segments": [segments[i]]} if segments is not None else {}
            rows.append(
                decoder(
                    input_ids=input_ids[i : i + 1, lo:hi],
                    position_ids=position_ids[i : i + 1, lo:hi],
                    attention_mask=None,
                    use_cache=False,
                    **extra,
                ).last_hidden_state
            )  # (1, s_pad / sp, d)
        # (n,): the targets whose predicting position is in this slice (on CUDA one host sync per forward, small
        # beside ALST's per-layer collectives)
        mine = (t.pi >= lo) & (t.pi < hi)
        local = Targets(t.bi[mine], t.ti[mine], t.pi[mine] - lo, t.sel[:, mine])
        return torch.cat(rows), local

    def _agreed_chunks(self, n: int, device: torch.device) -> int:
        """This rank's chunk count, or the largest over all ranks when `sync_chunks` is on in a multi-rank run."""
        mine = num_chunks(n, self.chunk_size)
        if not self.sync_chunks:
            return mine
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return mine
        t = torch.tensor([mine], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
