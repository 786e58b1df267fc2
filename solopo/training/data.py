"""Export table -> tokenized training examples, length-grouped batches, padded micro-batch tensors.

Prompts are user-message content; they are rendered in the run's chat format (solopo.chat: the chat template, an
optional system message) with the generation prompt, as synth counted and sampling rendered them. The completion
is the assistant text plus the template's end-of-turn tokens (for ChatML "<|im_end|>\\n"): it is the tokenized full
conversation minus the tokenized prompt, exactly as TRL's DPOTrainer cuts it.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import pyarrow as pa
import torch

from solopo.chat import ChatFormat
from solopo.pipeline.errors import DataError

# Which prompt the PO pair uses, which pair, and whether the RA sequence (x_long, y_w) exists, per mode.
MODES = {
    # mode: (PO prompt column, chosen column, rejected column, has RA long+chosen sequence)
    "solo": ("short_prompt", "chosen_response", "rejected_response", True),
    "short": ("short_prompt", "chosen_response", "rejected_response", False),
    "expand-long": ("long_prompt", "chosen_response", "rejected_response", False),
    "long": ("long_prompt", "long_chosen_response", "long_rejected_response", False),
}


@dataclass
class Seq:
    prompt: list[int]
    completion: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)

    @functools.cached_property
    def ids(self) -> torch.Tensor:
        """prompt + completion as a (len,) long tensor, built once (collation then only copies it)."""
        return torch.tensor(self.prompt + self.completion, dtype=torch.long)


@dataclass
class Example:
    id: str
    chosen: Seq  # PO pair
    rejected: Seq
    long_w: Seq | None  # (x_long, y_w) for the RA term; None when the mode has none

    @property
    def tokens(self) -> int:
        return len(self.chosen) + len(self.rejected) + (len(self.long_w) if self.long_w else 0)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode(tokenizer, user: str, assistant: str, chat: ChatFormat | None = None) -> Seq:
    """Render the prompt (with generation prompt) and the full turn in the chat format (default: the tokenizer's
    template, no system message); the completion is the difference."""
    chat = chat or ChatFormat()
    prompt = chat.prompt_ids(tokenizer, user)
    full = chat.full_ids(tokenizer, user, assistant)
    n = common_prefix_length(prompt, full)
    return Seq(prompt=full[:n], completion=full[n:])


def select_target_len(table: pa.Table, target_len: int | None, source: str) -> tuple[pa.Table, int | None]:
    """Keep the rows of one long-context length (default: the largest present)."""
    if "target_len" not in table.column_names:
        return table, None
    lens = sorted({int(x) for x in table.column("target_len").to_pylist() if x is not None})
    if not lens:
        return table, None
    want = lens[-1] if target_len is None else target_len
    if want not in lens:
        raise DataError(
            f"no rows with target_len={want}; the data has {lens}",
            path=source,
            field="target_len",
            hint=f"set train.target_len to one of {lens}, or synthesize that length first",
        )
    mask = [int(x) == want if x is not None else False for x in table.column("target_len").to_pylist()]
    return table.filter(pa.array(mask)), want


def build_examples(
    table: pa.Table,
    tokenizer,
    mode: str,
    with_long_w: bool,
    source: str,
    max_length: int | None = None,
    context_limit: int | None = None,
    chat: ChatFormat | None = None,
) -> tuple[list[Example], dict[str, list[str]]]:
    """Tokenize the rows a mode needs. Returns the examples and {drop reason: [ids]}: `over_model_context` for
    a sequence longer than the model's context (`context_limit`; positions past it were never trained and RoPE
    extrapolates silently), `over_max_length` for one longer than train.max_length."""
    prompt_col, w_col, l_col, _ = MODES[mode]
    cols = ["id", prompt_col, w_col, l_col] + (["long_prompt", "chosen_response"] if with_long_w else [])
    missing = [c for c in dict.fromkeys(cols) if c not in table.column_names]
    if missing:
        hint = "rerun the export stage"
        if mode == "long":
            hint = (
                "mode=long (Long-PO) trains on pairs sampled on x_long: rerun sampling with `sample.on=both` "
                "(e.g. `solopo pair --set sample.on=both`), or use mode=expand-long to train short-sampled pairs on x_long"
            )
        raise DataError(
            f"columns {missing} are missing for train.mode={mode}", path=source, field=missing[0], hint=hint
        )
    if "pair_index" in table.column_names:
        cols.append("pair_index")  # several pairs per question: the example key is id#pair_index
    rows = table.select(list(dict.fromkeys(cols))).to_pylist()
    examples: list[Example] = []
    drops: dict[str, list[str]] = {}
    for line, r in enumerate(rows, start=1):
        rid = str(r["id"]) if r.get("pair_index") is None else f"{r['id']}#{r['pair_index']}"
        if r[w_col] is None or r[l_col] is None:
            if mode == "long":
                drops.setdefault("no_long_pair", []).append(rid)
                continue
            raise DataError("empty chosen/rejected", path=source, line=line, field=w_col, hint="rerun the export stage")
        for c in (prompt_col, w_col, l_col):
            if not isinstance(r[c], str) or not r[c].strip():
                raise DataError(f"expected a non-empty string, got {r[c]!r}", path=source, line=line, field=c)
        chosen = encode(tokenizer, r[prompt_col], r[w_col], chat)
        rejected = encode(tokenizer, r[prompt_col], r[l_col], chat)
        long_w = encode(tokenizer, r["long_prompt"], r["chosen_response"], chat) if with_long_w else None
        seqs = [chosen, rejected] + ([long_w] if long_w else [])
        longest = max(len(s) for s in seqs)
        if context_limit is not None and longest > context_limit:
            drops.setdefault("over_model_context", []).append(rid)
            continue
        if max_length is not None and longest > max_length:
            drops.setdefault("over_max_length", []).append(rid)
            continue
        if min(len(s.completion) for s in seqs) == 0:
            drops.setdefault("empty_completion", []).append(rid)
            continue
        examples.append(Example(id=rid, chosen=chosen, rejected=rejected, long_w=long_w))
    if mode == "long" and not examples and drops.get("no_long_pair"):
        raise DataError(
            "no row has a long-sampled pair (long_chosen_response/long_rejected_response are all empty)",
            path=source,
            field="long_chosen_response",
            hint="rerun sampling with `sample.on=both`, or use train.mode=expand-long",
        )
    return examples, drops


def context_note(dropped: int, limit: int | None) -> str:
    """The run's note for examples dropped as longer than the model's context."""
    return (
        f"{dropped} example(s) have a sequence longer than the model's context of {limit} tokens "
        "(max_position_embeddings): dropped, counted under drops as over_model_context. Train on a shorter length "
        "(train.target_len, or synth.target_len) or a model with a longer context"
    )


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, mega: int = 16
) -> list[list[int]]:
    """Shuffle, then sort by length inside megabatches of `mega` batches (HF's LengthGroupedSampler idea):
    similar lengths share a padded batch while the order stays random. The last batch is filled cyclically so
    every batch (and every rank) has the same size."""
    n = len(lengths)
    if n == 0:
        return []
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(n))
    rng.shuffle(idx)
    need = -(-n // batch_size) * batch_size
    idx = idx + idx[: need - n] if need > n else idx
    while len(idx) < need:  # fewer examples than one batch
        idx += idx[: need - len(idx)]
    out = []
    size = batch_size * mega
    for s in range(0, len(idx), size):
        block = sorted(idx[s : s + size], key=lambda i: -lengths[i])
        out.extend(block[b : b + batch_size] for b in range(0, len(block), batch_size))
    rng.shuffle(out)
    return out


def collate(
    seqs: list[Seq], pad_id: int, full_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Right-pad sequences. Returns input_ids (b, s), attention_mask (b, s) or None when nothing is padded,
    and target masks: [completion] or [completion, all tokens] with `full_mask` (ORPO's sequence NLL)."""
    s = max(len(q) for q in seqs)
    b = len(seqs)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    attn = torch.zeros((b, s), dtype=torch.long)
    comp = torch.zeros((b, s), dtype=torch.bool)
    full = torch.zeros((b, s), dtype=torch.bool)
    for i, q in enumerate(seqs):
        p, c = len(q.prompt), len(q.completion)
        ids[i, : p + c] = q.ids
        attn[i, : p + c] = 1
        comp[i, p : p + c] = True
        full[i, 1 : p + c] = True
    masks = [comp, full] if full_mask else [comp]
    return ids, (None if bool(attn.all()) else attn), masks


@dataclass
class SharedPrefixBatch:
    """A chosen/rejected pair packed as one row [prompt, chosen completion, rejected completion] per example.

    The prompt is computed once for both answers: the rejected completion attends to the prompt and to itself but
    not to the chosen completion, and its positions restart after the prompt, so every completion token sees
    exactly what it sees in its own unpacked sequence. The attention pattern is given as `segments`, not as a
    (b, 1, s, s) mask (O(s^2) memory: 8 GiB at 64K tokens in bf16); `dense_mask()` builds that mask on demand."""

    input_ids: torch.Tensor  # (b, s)
    segments: list[tuple[int, int, int]]  # per row: (P prefix, W chosen branch, L rejected branch) tokens
    position_ids: torch.Tensor  # (b, s)
    pred_index: torch.Tensor  # (b, s): the position whose hidden state predicts the token at each position
    masks: list[torch.Tensor]  # (b, s) bool each: chosen completion, rejected completion[, chosen prompt+completion]

    def dense_mask(self) -> torch.Tensor:
        """(b, 1, s, s) bool, True = may attend: the same pattern as a mask (eager attention, tests)."""
        from solopo.training.logprobs import shared_prefix_dense_mask

        return shared_prefix_dense_mask(self.segments, self.input_ids.shape[1])


def collate_shared(examples: list[Example], pad_id: int, full_mask: bool = False) -> SharedPrefixBatch:
    """Pack each example's PO pair around the prefix its two sequences share (the prompt; should a tokenizer merge
    across the prompt/answer boundary differently, the common token prefix, the rest of each prompt then riding
    with its answer as non-target tokens). `full_mask` adds the chosen sequence's all-token mask (ORPO's
    sequence NLL) as a third mask."""
    rows = []
    for e in examples:
        w, lo = e.chosen.ids, e.rejected.ids
        k = common_prefix_length(e.chosen.prompt, e.rejected.prompt)  # <= both prompts: answers are never shared
        if k == 0:
            raise ValueError(f"example {e.id}: chosen and rejected share no prefix token")
        rows.append((w[:k], w[k:], lo[k:], len(e.chosen.prompt) - k, len(e.rejected.prompt) - k))
    b = len(rows)
    s = max(len(p) + len(w) + len(lo) for p, w, lo, _, _ in rows)
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    pos = torch.zeros((b, s), dtype=torch.long)
    pred = (torch.arange(s) - 1).clamp(min=0).repeat(b, 1)  # default: t is predicted by t-1
    m_w = torch.zeros((b, s), dtype=torch.bool)
    m_l = torch.zeros((b, s), dtype=torch.bool)
    m_full = torch.zeros((b, s), dtype=torch.bool)
    segments = []
    for i, (p, w, lo, w_extra, l_extra) in enumerate(rows):
        P, W, L = len(p), len(w), len(lo)  # w and lo: rest of the prompt (w_extra/l_extra tokens) + completion
        n = P + W + L
        segments.append((P, W, L))
        ids[i, :n] = torch.cat([p, w, lo])
        pos[i, : P + W] = torch.arange(P + W)
        pos[i, P + W : n] = torch.arange(P, P + L)  # the rejected branch continues the prefix, not the chosen
        pred[i, P + W] = P - 1  # the rejected branch's first token is predicted by the last prefix token
        m_w[i, P + w_extra : P + W] = True
        m_l[i, P + W + l_extra : n] = True
        m_full[i, 1 : P + W] = True
    masks = [m_w, m_l, m_full] if full_mask else [m_w, m_l]
    return SharedPrefixBatch(ids, segments, pos, pred, masks)
