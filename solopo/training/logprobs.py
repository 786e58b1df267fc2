"""Per-sequence completion log-probs without full-vocabulary logits over the prompt.

The decoder runs to hidden states; only the positions that predict a target token are gathered, and the
LM head is applied to them in chunks, each under activation checkpointing, so at most
`chunk_size x vocab` logits exist at a time, in the forward and in the backward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .losses import SeqLogps


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
) -> torch.Tensor:
    """log softmax(lm_head(hidden))[labels] for (n, d) hidden states, `chunk_size` rows at a time.

    `min_chunks` pads with empty chunks so that lm_head is called (forward, and recomputed in backward) at least
    that many times: under ZeRO-3 every call gathers the head's weights collectively, so all ranks must make the
    same number of calls."""
    out = []
    for c in range(max(num_chunks(hidden.shape[0], chunk_size), min_chunks)):
        start = c * chunk_size  # past the end for padding chunks: an empty (0, d) slice, still in the graph
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            # Recompute the chunk's logits in backward instead of keeping (chunk, vocab) floats alive.
            out.append(checkpoint(_token_logps, lm_head, h, y, softcap, use_reentrant=False))
        else:
            out.append(_token_logps(lm_head, h, y, softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class CompletionLogps(nn.Module):
    """Wraps a causal LM so that one forward returns per-sequence target log-prob sums.

    Being a module (not a function over the model) matters under DeepSpeed ZeRO-3: the engine wraps this
    module, and the parameter-gathering hooks fire for the decoder and the LM head as they are called.
    """

    def __init__(self, lm: nn.Module, chunk_size: int = 1024, sync_chunks: bool = False):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        # ZeRO-3 with several ranks: agree on the LM-head chunk count (all-reduce MAX) before calling the head.
        self.sync_chunks = sync_chunks
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        target_masks: list[torch.Tensor],
        position_ids: torch.Tensor | None = None,
        pred_index: torch.Tensor | None = None,
    ) -> list[SeqLogps]:
        """input_ids (b, s), right-padded; target_masks: (b, s) bool, True where the token is a target (never
        position 0). attention_mask: (b, s) padding mask or a (b, 1, s, s) custom mask (shared-prefix packing, with
        its position_ids and pred_index (b, s): which position predicts each token; default t-1).

        Returns one SeqLogps per mask (e.g. completion tokens, and all tokens for ORPO's sequence NLL)."""
        decoder = getattr(self.lm, self.lm.base_model_prefix)
        lm_head = self.lm.get_output_embeddings()
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
            impl = getattr(self.lm.config, "_attn_implementation", "sdpa")
            if impl not in ("sdpa", "eager"):
                raise ValueError(f"a custom (shared-prefix) attention mask needs sdpa or eager attention, not {impl}")
            # an additive mask works for both (eager adds it to the scores; a bool one would be added as 0/1)
            dtype = next(self.lm.parameters()).dtype
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
                ~attention_mask, torch.finfo(dtype).min
            )
        hidden = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (b, s, d)
        union = torch.zeros_like(target_masks[0])
        for m in target_masks:
            union = union | m
        if bool(union[:, 0].any()):
            raise ValueError("position 0 cannot be a target: no position predicts it")
        bi, ti = union.nonzero(as_tuple=True)  # (n,), (n,): target tokens
        pi = ti - 1 if pred_index is None else pred_index[bi, ti]  # (n,): the positions that predict them
        h = hidden[bi, pi]  # (n, d): only the positions that predict a target
        labels = input_ids[bi, ti]  # (n,)
        chunks = self._agreed_chunks(h.shape[0], h.device)
        tok = chunked_token_logps(lm_head, h, labels, self.chunk_size, self.softcap, chunks)  # (n,)
        b = input_ids.shape[0]
        out = []
        for m in target_masks:
            sel = m[bi, ti].to(tok.dtype)  # (n,)
            total = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, bi, tok * sel)  # (b,)
            count = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, bi, sel)  # (b,)
            out.append(SeqLogps(total=total, count=count))
        return out

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
