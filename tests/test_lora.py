"""LoRA (train.peft=lora) on the tiny 2-layer model: one SoLo-DPO step at alpha=0 equals TRL 1.16's DPOTrainer with
the same LoraConfig on the same batch (loss, rewards and adapter gradients, float32, with a non-zero adapter so
that policy != reference); the reference is the base model (adapter disabled); the trainable-parameter count is
PEFT's; outputs (adapter + merged, card); resume; the merged model generates as base + adapter; eval merges an
adapter-only dir; ZeRO-3 on CPU gives the plain run's losses; qlora on a CPU is a config error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from test_train import REPO, export_rows, killed_in_step, run, write_export_chain

from solopo.pipeline.errors import ConfigError
from solopo.training import peft as lora
from solopo.training.config import TrainConfig
from solopo.training.logprobs import CompletionLogps
from solopo.training.loop.reference import compute_ref_logps
from solopo.training.loop.step import micro_batch_logps
from solopo.training.loop.trainer import train
from solopo.training.losses import OBJECTIVES, LossParams

peft = pytest.importorskip("peft")
CPU = torch.device("cpu")
LORA = {"r": 4, "alpha": 8.0, "target_modules": "all-linear"}


def _lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _nonzero_adapter(peft_model, seed: int = 0) -> None:
    """Fill lora_A and lora_B with fixed random values: B = 0 (PEFT's init) would make policy == reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(peft_model.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One 3-step SoLo-DPO LoRA run (alpha 3, with the x_long forward, gradient checkpointing on), merged."""
    out = tmp_path_factory.mktemp("lora_run")
    return run(out, tiny_model_dir, algo="dpo", max_steps=3, peft="lora", lora=LORA, gradient_checkpointing=True)


def test_one_dpo_step_matches_trl_with_lora(tiny_model_dir, tokenizer, tmp_path):
    pytest.importorskip("datasets")
    from test_peer_trl import _args, _export_table, trl_dataset
    from trl import DPOConfig, DPOTrainer

    cfg = TrainConfig(algo="dpo", alpha=0.0, peft="lora", lora=LORA)
    ds = trl_dataset()
    tr = DPOTrainer(
        model=_lm(tiny_model_dir),
        args=_args(DPOConfig, tmp_path, beta=0.1),
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=lora.lora_config(cfg),  # the LoraConfig solopo builds from train.lora.*
    )
    _nonzero_adapter(tr.model)
    tr.model.train()
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
    theirs = tr.compute_loss(tr.model, inputs)
    theirs.backward()
    t_grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    t_rw, t_rl = tr._metrics["train"]["rewards/chosen"][-1], tr._metrics["train"]["rewards/rejected"][-1]

    from solopo.training.data import build_examples

    lm = _lm(tiny_model_dir)
    pm = lora.wrap(lm, cfg, zero3=False, note=lambda m: None)
    _nonzero_adapter(pm)
    module = CompletionLogps(lm, chunk_size=7)
    examples, _ = build_examples(_export_table(), tokenizer, "short", False, "rows")
    with lora.reference_context(pm):
        ref = compute_ref_logps(module, examples, tokenizer.pad_token_id, 2, "ref", CPU, with_long=False)
    module.train()
    batch, _ = micro_batch_logps(module, examples, tokenizer.pad_token_id, False, False, CPU)
    batch.ref_chosen, batch.ref_rejected = torch.tensor(ref["ref_chosen"]), torch.tensor(ref["ref_rejected"])
    out = OBJECTIVES["dpo"](batch, LossParams(alpha=0.0, beta=0.1))
    ours = out.loss.mean()
    ours.backward()

    assert abs(theirs.item() - 0.6931) > 1e-3  # the adapter moved the policy away from the reference
    torch.testing.assert_close(ours, theirs.detach().float(), rtol=0, atol=1e-5)
    assert out.reward_chosen.mean().item() == pytest.approx(t_rw, abs=1e-5)
    assert out.reward_rejected.mean().item() == pytest.approx(t_rl, abs=1e-5)
    o_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert o_grads.keys() == t_grads.keys() and len(o_grads) == 2 * 7 * 2  # A and B x 7 linears x 2 layers
    for n in o_grads:
        torch.testing.assert_close(o_grads[n], t_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_reference_is_the_base_model(tiny_model_dir, tokenizer):
    """With a non-zero adapter, the reference log-probs (adapter disabled) equal the plain base model's, and the
    policy's differ from them."""
    from solopo.training.data import build_examples

    examples, _ = build_examples(pa.Table.from_pylist(export_rows()), tokenizer, "solo", True, "rows")
    pad = tokenizer.pad_token_id
    base = compute_ref_logps(CompletionLogps(_lm(tiny_model_dir)), examples, pad, 2, "base", CPU, with_long=True)
    lm = _lm(tiny_model_dir)
    pm = lora.wrap(lm, TrainConfig(peft="lora", lora=LORA), zero3=False, note=lambda m: None)
    _nonzero_adapter(pm)
    with lora.reference_context(pm):
        ref = compute_ref_logps(CompletionLogps(lm), examples, pad, 2, "ref", CPU, with_long=True)
    policy = compute_ref_logps(CompletionLogps(lm), examples, pad, 2, "policy", CPU, with_long=True)
    for k in ("ref_chosen", "ref_rejected", "ref_long_w"):
        assert ref[k] == pytest.approx(base[k], abs=1e-6)
        assert max(abs(a - b) for a, b in zip(policy[k], base[k], strict=True)) > 1e-3


def test_lora_run_outputs_and_parameter_count(lora_run, tiny_model_dir):
    from safetensors.torch import load_file

    d = Path(lora_run["model_path"])
    info = lora_run["peft"]
    # PEFT's own count for the same config on the same model, and r * (in + out) per adapted linear by hand
    pm = peft.get_peft_model(_lm(tiny_model_dir), lora.lora_config(TrainConfig(peft="lora", lora=LORA)))
    assert (info["trainable_params"], info["all_params"]) == pm.get_nb_trainable_parameters()
    linears = [
        m for n, m in _lm(tiny_model_dir).named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]
    assert info["trainable_params"] == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert info["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # the adapter as PEFT saves it, and the merged HF checkpoint at the top
    adapter = load_file(d / "adapter" / lora.ADAPTER_WEIGHTS)
    assert sum(v.numel() for v in adapter.values()) == info["trainable_params"]
    assert any(("lora_B" in k) and v.abs().max() > 0 for k, v in adapter.items())  # it trained
    conf = json.loads((d / "adapter" / lora.ADAPTER_CONFIG).read_text())
    assert (conf["r"], conf["lora_alpha"], conf["peft_type"]) == (4, 8.0, "LORA")
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    # DPO's first step: the adapter starts at B = 0, so policy == reference and the loss is log 2
    first = json.loads((d / "logs.jsonl").read_text().splitlines()[0])
    assert first["po_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert any("trainable parameters" in n and "adapter disabled" in n for n in lora_run["notes"])


def test_merged_model_generates_as_base_plus_adapter(lora_run, tiny_model_dir, tokenizer):
    d = Path(lora_run["model_path"])
    merged = _lm(d).eval()
    with_adapter = peft.PeftModel.from_pretrained(_lm(tiny_model_dir), str(d / "adapter")).eval()
    ids = tokenizer("Where was item 3 made? The answer is", return_tensors="pt").input_ids
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        a, b = merged.generate(ids, **kw), with_adapter.generate(input_ids=ids, **kw)
        torch.testing.assert_close(merged(ids).logits, with_adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        base_logits = _lm(tiny_model_dir)(ids).logits
    assert torch.equal(a, b)
    assert (merged(ids).logits - base_logits).abs().max() > 1e-4  # the merge changed the weights


def test_model_card_names_the_adapter(lora_run, tiny_model_dir):
    from huggingface_hub import ModelCard

    from solopo.training.model_card import write_model_card

    d = Path(lora_run["model_path"])
    write_model_card(d, base_model="Org/Base", result=lora_run, train_config={}, datasets=["musique"])
    card = ModelCard((d / "README.md").read_text())
    assert card.data.base_model == "Org/Base" and card.data.library_name == "transformers"
    assert {"peft", "lora"} <= set(card.data.tags)
    assert "base_model:adapter:Org/Base" not in card.data.tags  # merged: a fine-tune of the base, not an adapter
    assert "| LoRA r / alpha / dropout | 4 / 8 / 0 |" in card.text and "q_proj" in card.text
    assert "the adapter merged into the base (adapter in `adapter/`)" in card.text


def test_adapter_only_run_and_eval_merge(lora_run, tiny_model_dir, tmp_path):
    """merge_adapter=false leaves the adapter at the top; eval merges it on load (cached), equal to the merged
    checkpoint of the same training."""
    r = run(tmp_path, tiny_model_dir, algo="dpo", max_steps=3, peft="lora", lora=LORA, merge_adapter=False,
            gradient_checkpointing=True)  # fmt: skip
    d = Path(r["model_path"])
    assert lora.is_adapter_dir(d) and not (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()
    from huggingface_hub import ModelCard

    from solopo.training.model_card import write_model_card

    write_model_card(d, base_model="Org/Base", result=r, train_config={}, datasets=[])
    card = ModelCard((d / "README.md").read_text())
    assert card.data.library_name == "peft" and "base_model:adapter:Org/Base" in card.data.tags
    assert "PeftModel.from_pretrained(base" in card.text and "the adapter only" in card.text
    notes: list[str] = []
    path, info = lora.merged_for_eval(d, tmp_path / "merged", notes.append)
    assert info["base_model"] == str(tiny_model_dir) and info["how"] == "peft merge_and_unload"
    assert "evaluated merged into its base" in notes[0]
    want, got = _lm(lora_run["model_path"]).state_dict(), _lm(path).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    mtime = (Path(path) / "model.safetensors").stat().st_mtime_ns
    # the eval stage's hook: generates with the merged copy (cached: not merged again), records it per model
    from types import SimpleNamespace

    from solopo.stages.evaluate import EvalModel, EvalStage

    stage = SimpleNamespace(ctx=SimpleNamespace(out_dir=tmp_path, note=notes.append), _adapters={})
    model, info = EvalModel("solo", str(d), "trained"), {}
    assert EvalStage._generation_path(stage, model, info) == path
    assert info["adapter"]["merged_to"] == path and stage._adapters == {"solo": info["adapter"]}
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == mtime
    plain = EvalModel("full", str(lora_run["model_path"]), "trained")
    assert EvalStage._generation_path(stage, plain, {}) == plain.path  # a merged dir is used as it is


@pytest.mark.parametrize("algo,mode", [("orpo", "solo"), ("simpo", "long-shared"), ("dpo", "expand-long")])
def test_every_algo_and_mode_trains_only_the_adapter(tmp_path, tiny_model_dir, algo, mode):
    from safetensors.torch import load_file

    shared = mode.endswith("-shared")
    mode = mode.removesuffix("-shared")
    rows = export_rows()
    if mode == "long":
        for r in rows:
            r["long_chosen_response"], r["long_rejected_response"] = r["chosen_response"], r["rejected_response"]
    cfg = TrainConfig(
        algo=algo, mode=mode, max_steps=2, lr=1e-2, grad_accum=1, warmup_ratio=0.0, lr_scheduler="constant",
        shared_prefix=shared, peft="lora", lora=LORA, merge_adapter=False,
    )  # fmt: skip
    r = train(cfg, model_path=str(tiny_model_dir), table=pa.Table.from_pylist(rows), out_dir=tmp_path, seed=0)
    assert r["steps"] == 2 and r["peft"]["trainable_params"] > 0
    adapter = load_file(Path(r["model_path"]) / lora.ADAPTER_WEIGHTS)
    assert all("lora_" in k for k in adapter) and any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())


def test_resume_from_a_checkpoint_with_lora(tmp_path, tiny_model_dir):
    """Killed after the step-2 checkpoint, resumed: the same adapter as an uninterrupted run."""
    from safetensors.torch import load_file

    kw = {"algo": "orpo", "max_steps": 4, "save_steps": 2, "peft": "lora", "lora": LORA, "merge_adapter": False}
    full = run(tmp_path / "full", tiny_model_dir, **kw)
    with killed_in_step(4):
        run(tmp_path / "part", tiny_model_dir, **kw)
    # the checkpoint holds the adapter (and the optimizer), not the frozen base
    ckpt = torch.load(tmp_path / "part/models/orpo-solo.checkpoints/step-2/state.pt", weights_only=True)
    assert ckpt["model"] and all("lora_" in k for k in ckpt["model"])
    resumed = run(tmp_path / "part", tiny_model_dir, **kw)
    assert any("resumed from checkpoint" in n for n in resumed["notes"]) and resumed["steps"] == 4
    a = load_file(Path(full["model_path"]) / lora.ADAPTER_WEIGHTS)
    b = load_file(Path(resumed["model_path"]) / lora.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_qlora_on_cpu_is_a_config_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*train.peft=lora"):
        run(tmp_path, tiny_model_dir, peft="qlora")
    with pytest.raises(ValueError, match="lora.dropout=0.1 with disable_dropout=true"):
        TrainConfig(peft="lora", lora={"dropout": 0.1})


def test_lora_under_deepspeed_zero3_cpu(tmp_path, tiny_model_dir, lora_run):
    """`solopo train` with LoRA under ZeRO-3 on one CPU process, gradient checkpointing on: the plain run's losses;
    the adapter is gathered and saved and the merged model written."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={tiny_model_dir}"]
    write_export_chain(run_dir, common)
    sets = [*common, "train.max_steps=3", "train.micro_batch_size=1", "train.grad_accum=1", "train.lr=1e-3",
            "train.warmup_ratio=0", "train.lr_scheduler=constant", "train.max_grad_norm=1e9",
            "train.deepspeed=zero3", "train.gradient_checkpointing=true", "train.peft=lora", "train.lora.r=4",
            "train.lora.alpha=8"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "solopo.cli", "train", "--algo", "dpo"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = run_dir / "train" / "models" / "dpo-solo"
    ds = [json.loads(x)["loss"] for x in (d / "logs.jsonl").read_text().splitlines()]
    plain = [json.loads(x)["loss"] for x in (Path(lora_run["model_path"]) / "logs.jsonl").read_text().splitlines()]
    assert ds == pytest.approx(plain, rel=1e-4)
    assert (d / "adapter" / lora.ADAPTER_WEIGHTS).is_file()
    _lm(d)  # the merged checkpoint loads
