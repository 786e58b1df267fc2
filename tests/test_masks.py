"""Attention without a dense (b, 1, s, s) mask: the right-padded pair runs with no mask at all, the shared-prefix
packed row as segments (segment_sdpa). Both must give the log-probs and gradients of today's dense-mask path."""

from __future__ import annotations

import pytest
import torch

from solopo.training.data import Example, Seq, collate, collate_shared
from solopo.training.logprobs import (
    SEGMENT_ATTN,
    CompletionLogps,
    segment_sdpa,
    shared_prefix_dense_mask,
    targets_from_masks,
    use_segment_attention,
)
from solopo.training.loop.step import micro_batch_logps

CPU = torch.device("cpu")


def _lm(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(torch.float64), attn  # float64 decoder; the LM head's log-softmax is fp32


def _examples() -> list[Example]:
    """Rows of different lengths (padding in both layouts) and one pair whose prompts differ at the end."""
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 97, (n,), generator=g).tolist()

    out = []
    for i, (p, w, lo) in enumerate([(9, 4, 6), (5, 7, 3), (12, 2, 2)]):
        x = ids(p)
        out.append(Example(f"e{i}", Seq(x, ids(w)), Seq(x, ids(lo)), Seq(ids(p + 5), ids(w))))
    x = ids(6)
    out.append(Example("diff", Seq(x + [4], ids(3)), Seq(x + [5, 6], ids(4)), Seq(ids(8), ids(3))))
    return out


def _run(lm, fn):
    lm.zero_grad()
    vals = fn()
    sum(v.total.sum() * (i + 1) for i, v in enumerate(vals)).backward()
    return [v.total.detach() for v in vals], {k: p.grad.clone() for k, p in lm.named_parameters()}


def _assert_same(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-5)  # fp32 log-softmax: summation-order noise only
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=2e-6)


def test_right_padded_pair_needs_no_mask():
    """Dropping the padding mask of a right-padded batch changes no real token's log-prob or gradient."""
    lm, _ = _lm()
    lm.config._attn_implementation = "sdpa"
    module = CompletionLogps(lm, chunk_size=5).train()
    ex = _examples()
    pair = [e.chosen for e in ex] + [e.rejected for e in ex]
    ids, attn, masks = collate(pair, pad_id=0, full_mask=True)
    assert attn is not None  # the rows really are padded
    with_mask = _run(lm, lambda: module(ids, attn, masks))
    without = _run(lm, lambda: module(ids, None, targets_from_masks(masks)))
    _assert_same(with_mask, without)


@pytest.mark.parametrize("full_mask", [False, True])
def test_segment_attention_equals_dense_mask(full_mask):
    """The shared-prefix row attended as segments == the same row under today's dense float mask (sdpa and
    eager), log-probs and gradients, with padded rows and GQA."""
    ex = _examples()
    sp = collate_shared(ex, pad_id=0, full_mask=full_mask)
    assert len({sum(seg) for seg in sp.segments}) > 1  # rows of different lengths: pads present
    tg = targets_from_masks(sp.masks, sp.pred_index)
    res = {}
    for impl in ("eager", "sdpa", SEGMENT_ATTN):
        lm, _ = _lm()
        lm.config._attn_implementation = "eager" if impl == "eager" else "sdpa"
        if impl == SEGMENT_ATTN:
            assert use_segment_attention(lm)
        module = CompletionLogps(lm, chunk_size=4).train()
        if impl == SEGMENT_ATTN:  # segments only: no mask exists anywhere
            res[impl] = _run(lm, lambda m=module: m(sp.input_ids, None, tg, sp.position_ids, None, sp.segments))
        else:  # today's path: the dense (b, 1, s, s) mask
            res[impl] = _run(
                lm, lambda m=module: m(sp.input_ids, sp.dense_mask(), sp.masks, sp.position_ids, sp.pred_index)
            )
    _assert_same(res["eager"], res["sdpa"])
    _assert_same(res["sdpa"], res[SEGMENT_ATTN])


def test_shared_prefix_training_path_equals_padded_pair():
    """micro_batch_logps with shared_prefix on a segment-attention model == the padded pair (no mask)."""
    lm, _ = _lm()
    lm.config._attn_implementation = "sdpa"
    module = CompletionLogps(lm, chunk_size=3).train()
    ex = _examples()

    def logps(shared):
        b, _ = micro_batch_logps(module, ex, 0, True, True, CPU, shared_prefix=shared)
        return [b.chosen, b.rejected, b.nll_w, b.long_w]

    padded = _run(lm, lambda: logps(False))
    assert use_segment_attention(lm)
    shared = _run(lm, lambda: logps(True))
    _assert_same(padded, shared)


def test_dense_mask_layout():
    m = shared_prefix_dense_mask([(3, 2, 2), (2, 1, 1)], 7)  # (2, 1, 7, 7)
    assert m.shape == (2, 1, 7, 7)
    assert m[0, 0, 5, :3].all() and not m[0, 0, 5, 3:5].any() and m[0, 0, 5, 5] and not m[0, 0, 5, 6]
    assert m[1, 0, 4:, :4].sum() == 0 and m[1, 0, 5, 5] and m[1, 0, 6, 6]  # pads see themselves only


def test_segment_sdpa_without_segments_is_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    mod = torch.nn.Module()
    mod.is_causal = True
    a, _ = segment_sdpa(mod, q, k, v, None)
    b, _ = sdpa_attention_forward(mod, q, k, v, None)
    torch.testing.assert_close(a, b)


def test_segment_path_builds_no_mask(monkeypatch):
    """The packed row's restarting position_ids look like packed sequences to transformers, which would build a
    dense (b, 1, s, s) mask for them: under SEGMENT_ATTN the mask builder returns none."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    lm, _ = _lm()
    lm.config._attn_implementation = "sdpa"
    assert use_segment_attention(lm)
    built = []
    real = ALL_MASK_ATTENTION_FUNCTIONS[SEGMENT_ATTN]
    monkeypatch.setitem(
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping,
        SEGMENT_ATTN,
        lambda *a, **k: built.append(real(*a, **k)) or built[-1],
    )
    sp = collate_shared(_examples(), pad_id=0)
    tg = targets_from_masks(sp.masks, sp.pred_index)
    out = CompletionLogps(lm)(sp.input_ids, None, tg, sp.position_ids, None, sp.segments)
    assert torch.isfinite(out[0].total).all()
    assert built and all(m is None for m in built)
