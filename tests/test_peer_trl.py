"""Peer equivalence: with alpha = 0 on the short prompts, SoLo-DPO / SoLo-SimPO / SoLo-ORPO reproduce the loss of
TRL 1.16's DPOTrainer, CPOTrainer(loss_type="simpo") and ORPOTrainer on the same batch and tiny model.

DPO runs end to end from the texts (our chat-template tokenization must equal TRL's conversational one).
CPO/ORPO take a plain-text prompt and append EOS themselves, so their tokenized batch is fed to our log-prob and
loss code as is. TRL's ORPOTrainer averages its NLL over prompt+completion tokens pooled over the batch:
we compare with `orpo_nll=sequence` at batch size 1 (our default is the paper's completion-only NLL).
"""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from solopo.training.data import Seq, build_examples
from solopo.training.logprobs import CompletionLogps
from solopo.training.loop.step import micro_batch_logps
from solopo.training.losses import OBJECTIVES, LossParams

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [
    {
        "id": "a",
        "short_prompt": "Document 1: Oslo is the capital of Norway.\n\nQuestion: What is the capital of Norway?",
        "chosen": "Document 1 says Oslo. The answer is: Oslo",
        "rejected": "I think it is Bergen. The answer is: Bergen",
    },
    {
        "id": "b",
        "short_prompt": "Document 1: The Nile flows north.\n\nQuestion: Which way does the Nile flow?",
        "chosen": "North, per the document. The answer is: north",
        "rejected": "The answer is: south, because rivers flow south in Africa",
    },
]
CPU = torch.device("cpu")


def _export_table() -> pa.Table:
    """ROWS as the export stage names them (chosen_response / rejected_response)."""
    return pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "short_prompt": r["short_prompt"],
                "chosen_response": r["chosen"],
                "rejected_response": r["rejected"],
            }
            for r in ROWS
        ]
    )


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from solopo.models import build_tiny_model

    ref_dir = build_tiny_model(tmp_path_factory.mktemp("ref") / "tiny-ref", seed=1)  # a reference != policy
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return load(tiny_model_dir), load(ref_dir)


def _ours(model, examples, algo, params, sequence_nll=False, ref=None):
    fwd = CompletionLogps(model, chunk_size=7)  # small chunks: exercises the chunked LM head
    batch, _ = micro_batch_logps(fwd, examples, pad_id=2, with_long=False, orpo_sequence_nll=sequence_nll, device=CPU)
    if ref is not None:
        with torch.no_grad():
            rb, _ = micro_batch_logps(CompletionLogps(ref), examples, 2, False, False, CPU)
        batch.ref_chosen, batch.ref_rejected = rb.chosen.total, rb.rejected.total
    return OBJECTIVES[algo](batch, params).loss.mean()


def _args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=len(ROWS),
        remove_unused_columns=False,
        bf16=False,
        seed=0,
        **kw,
    )


def trl_dataset() -> datasets.Dataset:
    """ROWS as TRL's conversational preference dataset (the short prompt, as SoLoPO's x_short)."""
    return datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["short_prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in ROWS
        ]
    )


def test_dpo_matches_trl(models, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer

    policy, ref = models
    ds = trl_dataset()
    tr = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=_args(DPOConfig, tmp_path, beta=0.1),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, inputs)
    examples, _ = build_examples(_export_table(), tokenizer, "short", False, "rows")
    with torch.no_grad():
        ours = _ours(policy, examples, "dpo", LossParams(alpha=0.0, beta=0.1), ref=ref)
    assert abs(theirs.item() - 0.6931) > 1e-4  # a real reference: not the trivial log 2 of policy == reference
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)


def _text_rows(tokenizer):
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": r["short_prompt"]}], add_generation_prompt=True, tokenize=False
            ),
            "chosen": r["chosen"],
            "rejected": r["rejected"],
        }
        for r in ROWS
    ]


def _examples_from_trl_batch(inputs) -> list:
    """TRL's padded chosen/rejected rows (labels -100 on the prompt) -> our Seq(prompt, completion)."""
    from solopo.training.data import Example

    out = []
    for i in range(inputs["chosen_input_ids"].shape[0]):
        seqs = []
        for k in ("chosen", "rejected"):
            ids, att, lab = (inputs[f"{k}_{n}"][i] for n in ("input_ids", "attention_mask", "labels"))
            ids, lab = ids[att.bool()].tolist(), lab[att.bool()].tolist()
            p = sum(1 for x in lab if x == -100)
            seqs.append(Seq(prompt=ids[:p], completion=ids[p:]))
        out.append(Example(id=str(i), chosen=seqs[0], rejected=seqs[1], long_w=None))
    return out


def test_simpo_matches_trl_cpo(models, tokenizer, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _ = models
    args = _args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5)
    tr = CPOTrainer(
        model=policy,
        args=args,
        train_dataset=datasets.Dataset.from_list(_text_rows(tokenizer)),
        processing_class=tokenizer,
    )
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, inputs)
        ours = _ours(policy, _examples_from_trl_batch(inputs), "simpo", LossParams(alpha=0.0, beta=2.0, gamma=0.5))
    # their prompt tokens are our chat-template prompt tokens
    ex, _ = build_examples(_export_table(), tokenizer, "short", False, "rows")
    assert {tuple(e.chosen.prompt) for e in ex} == {tuple(e.chosen.prompt) for e in _examples_from_trl_batch(inputs)}
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row", [0, 1])
def test_orpo_matches_trl(models, tokenizer, tmp_path, row):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, _ = models
    args = _args(ORPOConfig, tmp_path, beta=0.1)
    args.per_device_train_batch_size = 1
    rows = [_text_rows(tokenizer)[row]]
    tr = ORPOTrainer(
        model=policy, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, inputs)
        ex = _examples_from_trl_batch(inputs)
        ours = _ours(policy, ex, "orpo", LossParams(alpha=0.0, orpo_lambda=0.1), sequence_nll=True)
        paper = _ours(policy, ex, "orpo", LossParams(alpha=0.0, orpo_lambda=0.1), sequence_nll=False)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)
    assert abs(paper.item() - theirs.item()) > 1e-4  # completion-only NLL (the default) is a different number
