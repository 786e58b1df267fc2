"""The training hot path's choices: train.deepspeed=auto, length-grouped full batches, and that the step keeps its
host syncs to a fixed few per optimizer step however many micro-batches it has."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from test_train import export_rows

from solopo.training.config import TrainConfig
from solopo.training.data import build_examples, length_grouped_batches
from solopo.training.logprobs import CompletionLogps
from solopo.training.loop import backends, settings, step
from solopo.training.losses import OBJECTIVES


def test_deepspeed_auto(tiny_model_dir, monkeypatch):
    n = settings.count_parameters(str(tiny_model_dir))
    from transformers import AutoModelForCausalLM

    assert n == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    auto = TrainConfig(deepspeed="auto")
    assert (
        settings.resolve_deepspeed(TrainConfig(deepspeed="zero2"), str(tiny_model_dir), 1, torch.float32)[0] == "zero2"
    )
    assert (
        settings.resolve_deepspeed(TrainConfig(deepspeed="auto", offload="optimizer"), "x", 1, torch.float32)[0]
        == "zero3"
    )
    if not torch.cuda.is_available():
        assert settings.resolve_deepspeed(auto, str(tiny_model_dir), 1, torch.float32) == ("none", "CPU: plain torch")

    # a GPU, simulated: fits (4 x 2 bytes x n <= half of it) -> none; does not fit or several ranks -> zero3
    class Props:
        total_memory = 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    Props.total_memory = 2 * 4 * 2 * n  # exactly twice the need
    assert settings.resolve_deepspeed(auto, str(tiny_model_dir), 1, torch.bfloat16)[0] == "none"
    Props.total_memory = 2 * 4 * 2 * n - 1
    choice, why = settings.resolve_deepspeed(auto, str(tiny_model_dir), 1, torch.bfloat16)
    assert choice == "zero3" and "over half" in why
    assert settings.resolve_deepspeed(auto, str(tiny_model_dir), 2, torch.bfloat16)[0] == "zero3"


def test_default_is_auto_and_offload_full_allowed_with_auto():
    assert TrainConfig().deepspeed == "auto"
    TrainConfig(deepspeed="auto", offload="full")
    with pytest.raises(ValueError, match="offload=full"):
        TrainConfig(deepspeed="zero2", offload="full")


def test_length_grouped_batches_are_full_and_sorted():
    """Every global batch holds exactly micro x accum x world examples (the last one filled cyclically) and is sorted
    longest first, so each rank's contiguous micro-batches hold neighbours in length (little padding)."""
    lengths = [int(x) for x in torch.randint(50, 5000, (37,), generator=torch.Generator().manual_seed(0))]
    for size in (1, 2, 4, 8):
        batches = length_grouped_batches(lengths, size, seed=0, epoch=1, mega=4)
        assert all(len(b) == size for b in batches)
        assert all([lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches)
        assert set(range(37)) <= {i for b in batches for i in b}


def test_host_syncs_per_step_do_not_grow_with_micro_batches(tiny_model_dir, tokenizer):
    """train_step reads device values a fixed number of times per optimizer step (the finiteness of the losses,
    the grad norm), not per micro-batch: counted with torch.profiler (aten::_local_scalar_dense = .item()/bool())."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    ex, _ = build_examples(pa.Table.from_pylist(export_rows(8)), tokenizer, "solo", True, "x")
    counts = {}
    for accum in (1, 4):
        lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        module = CompletionLogps(lm).train()
        cfg = TrainConfig(algo="simpo", micro_batch_size=2, grad_accum=accum, deepspeed="none")
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
        backend = backends.PlainBackend(module, opt, backends.make_scheduler(opt, cfg, 10), cfg)
        params = settings.resolve_params(cfg)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function("step"):
                step.train_step(
                    backend, OBJECTIVES["simpo"], params, ex[: 2 * accum], cfg, 2, True, torch.device("cpu")
                )
        counts[accum] = sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense" and not _inside(e))
    # reads of host tensors during collation are not device syncs, and the decoder is transformers' (it reads one
    # scalar per forward: its packed-sequence check of position_ids); outside them the count must not grow with
    # the micro-batches (before this change: 7 float() per micro-batch for the logs, 1 isfinite, 2 per forward)
    assert counts[4] == counts[1], counts


def _inside(e) -> bool:
    while e is not None:
        if e.name in ("solopo.collate", "solopo.decoder"):
            return True
        e = e.cpu_parent
    return False
