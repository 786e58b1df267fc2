"""Shared prefix (train.shared_prefix): each pair's prompt computed once, chosen and rejected packed in one row
with a block-causal mask. Same log-probs, gradients and training as the padded pair batch, fewer tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from test_train import export_rows, run, weights

from solopo.training.config import TrainConfig
from solopo.training.data import build_examples, collate_shared
from solopo.training.logprobs import CompletionLogps
from solopo.training.loop.step import micro_batch_logps


def test_packed_row_layout(tokenizer):
    ex, _ = build_examples(pa.Table.from_pylist(export_rows(1)), tokenizer, "solo", True, "x")
    e = ex[0]
    P, W, L = len(e.chosen.prompt), len(e.chosen.completion), len(e.rejected.completion)
    sp = collate_shared(ex, pad_id=2)
    assert sp.input_ids[0].tolist() == e.chosen.prompt + e.chosen.completion + e.rejected.completion
    assert sp.position_ids[0, P + W].item() == P  # the rejected answer continues the prompt
    m = sp.dense_mask()[0, 0]
    assert m[P + W, :P].all() and not m[P + W, P : P + W].any() and m[P + W, P + W]  # sees prompt, not chosen
    assert sp.pred_index[0, P + W].item() == P - 1 and sp.pred_index[0, P + 1].item() == P
    assert sp.masks[0][0].sum().item() == W and sp.masks[1][0].sum().item() == L


def test_prompts_that_differ_share_their_common_prefix():
    """Should the two prompts' tokens differ at the end, only the common prefix is shared; targets stay exact."""
    from solopo.training.data import Example, Seq

    e = Example("x", Seq([5, 6, 7, 8], [9, 10]), Seq([5, 6, 7, 11], [12]), None)
    sp = collate_shared([e], pad_id=0)
    assert sp.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert sp.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    assert sp.masks[0][0].nonzero().flatten().tolist() == [4, 5]  # 9, 10
    assert sp.masks[1][0].nonzero().flatten().tolist() == [7]  # 12 (11 is the rejected prompt's own last token)
    assert sp.pred_index[0, 6].item() == 2 and sp.pred_index[0, 7].item() == 6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_logps_and_gradients_as_the_padded_pair(tiny_model_dir, tokenizer, attn):
    from transformers import AutoModelForCausalLM

    ex, _ = build_examples(pa.Table.from_pylist(export_rows(3)), tokenizer, "solo", True, "x")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)
    module = CompletionLogps(lm, chunk_size=3).train()
    res = {}
    for shared in (False, True):
        lm.zero_grad()
        b, tokens = micro_batch_logps(module, ex, 2, True, True, torch.device("cpu"), shared_prefix=shared)
        (b.chosen.total - 2 * b.rejected.total + 0.3 * b.nll_w.total + 0.1 * b.long_w.total).sum().backward()
        res[shared] = (b, tokens, {k: p.grad.clone() for k, p in lm.named_parameters()})
    (a, ta, ga), (c, tc, gc) = res[False], res[True]
    assert tc == ta - sum(len(e.rejected.prompt) for e in ex)  # one prompt per pair instead of two
    for f in ("chosen", "rejected", "nll_w", "long_w"):
        torch.testing.assert_close(getattr(c, f).total, getattr(a, f).total, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(c, f).count, getattr(a, f).count)
    for k in ga:
        torch.testing.assert_close(gc[k], ga[k], rtol=1e-4, atol=1e-5)  # summation-order noise


def test_training_with_shared_prefix_matches(tmp_path, tiny_model_dir):
    a = run(tmp_path / "a", tiny_model_dir, algo="orpo", max_steps=2, micro_batch_size=2, gradient_checkpointing=True)
    b = run(
        tmp_path / "b",
        tiny_model_dir,
        algo="orpo",
        max_steps=2,
        micro_batch_size=2,
        gradient_checkpointing=True,
        shared_prefix=True,
    )
    la = [json.loads(x) for x in (Path(a["model_path"]) / "logs.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (Path(b["model_path"]) / "logs.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], rel=1e-5)
    assert all(rb["num_tokens"] < ra["num_tokens"] for ra, rb in zip(la, lb, strict=True))
    wa, wb = weights(a["model_path"]), weights(b["model_path"])
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5)


def test_shared_prefix_refuses_flash_attention():
    with pytest.raises(ValueError, match="shared_prefix needs"):
        TrainConfig(shared_prefix=True, attn="flash_attention_2")
