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


def chunked_token_logps(
    lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024, softcap: float | None = None
) -> torch.Tensor:
    """log softmax(lm_head(hidden))[labels] for (n, d) hidden states, `chunk_size` rows at a time."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
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

    def __init__(self, lm: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target_masks: list[torch.Tensor]
    ) -> list[SeqLogps]:
        """input_ids (b, s), right-padded; target_masks: (b, s) bool, True where the token is a target.

        Returns one SeqLogps per mask (e.g. completion tokens, and all tokens for ORPO's sequence NLL)."""
        decoder = getattr(self.lm, self.lm.base_model_prefix)
        lm_head = self.lm.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # (b, s, d); position t-1 predicts token t
        union = torch.zeros_like(target_masks[0])
        for m in target_masks:
            union = union | m
        bi, ti = union[:, 1:].nonzero(as_tuple=True)  # (n,), (n,)
        h = hidden[:, :-1][bi, ti]  # (n, d): only the positions that predict a target
        labels = input_ids[:, 1:][bi, ti]  # (n,)
        tok = chunked_token_logps(lm_head, h, labels, self.chunk_size, self.softcap)  # (n,)
        b = input_ids.shape[0]
        out = []
        for m in target_masks:
            sel = m[:, 1:][bi, ti].to(tok.dtype)  # (n,)
            total = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, bi, tok * sel)  # (b,)
            count = torch.zeros(b, dtype=tok.dtype, device=tok.device).index_add(0, bi, sel)  # (b,)
            out.append(SeqLogps(total=total, count=count))
        return out
