"""Training never saves a broken model or stale logs (issue 8 item 4), and the trained model dir follows HF
conventions (issue 10 item 7): finite checks, dropout, logs.jsonl, weights_only checkpoints, the reference
variants, the saved dtype, trainer_state.json / all_results.json and the model card."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import SHARED
from test_train import export_rows, killed_in_step, run

from solopo.api import build_config
from solopo.pipeline.errors import ConfigError, RunDirError, SolopoError
from solopo.training.loop.settings import TrainingError
from solopo.training.loop.step import disable_dropout, step_health

CPU = torch.device("cpu")


def log_rows(model_path) -> list[dict]:
    return [json.loads(x) for x in (Path(model_path) / "logs.jsonl").read_text().splitlines()]


# --- finite checks ------------------------------------------------------------------------------------------
def test_step_health_hand_cases():
    ok = [torch.ones(3), torch.full((2, 2), 1e30)]  # huge but finite: max |p| does not overflow like a 2-norm
    assert step_health(torch.tensor(2.5), ok, [torch.zeros(2)], CPU) == (2.5, [])
    assert step_health(torch.tensor(float("nan")), ok, [], CPU)[1] == ["gradients"]
    assert step_health(1.0, [torch.tensor([1.0, float("-inf")])], [], CPU)[1] == ["parameters"]
    assert step_health(1.0, [torch.tensor([float("nan")]), torch.empty(0)], [], CPU)[1] == ["parameters"]
    bad_loss = [torch.zeros(2), torch.tensor([float("inf")])]
    assert step_health(float("inf"), ok, bad_loss, CPU)[1] == ["gradients", "loss"]


def test_exploding_lr_fails_and_saves_nothing(tmp_path, tiny_model_dir):
    """lr=1e30 (the issue's repro): step 1's update is finite, step 2's is NaN. The run fails naming the step and
    its examples; the step-1 checkpoint is finite and loads with weights_only=True; the previous model in the same
    place, logs.jsonl included, is untouched and no temp dir is left (issue 20 item 3)."""
    prev = run(tmp_path, tiny_model_dir, algo="orpo", max_steps=2)
    model_dir = Path(prev["model_path"])
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    with pytest.raises(TrainingError, match=r"non-finite gradients and parameters at optimizer step 2, examples \['q"):
        run(tmp_path, tiny_model_dir, algo="orpo", lr=1e30, max_steps=3, save_steps=1)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before
    assert [r["step"] for r in log_rows(model_dir)] == [1, 2]  # the previous run's log, not the failed one's
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["orpo-solo", "orpo-solo.checkpoints"]
    ckpts = sorted((tmp_path / "models" / "orpo-solo.checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-1"]
    blob = torch.load(ckpts[0] / "state.pt", map_location="cpu", weights_only=True)
    assert blob["step"] == 1 and all(torch.isfinite(v).all() for v in blob["model"].values())


def test_infinite_lr_is_a_config_error(tmp_path, tiny_model_dir):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="finite"):  # TrainConfig itself, also when built in code
        run(tmp_path, tiny_model_dir, algo="simpo", lr=float("inf"), max_steps=2)


def test_nonfinite_loss_names_its_examples(tmp_path, tiny_model_dir, monkeypatch):
    """A NaN loss in one example of a 4-example step: the error names the step, all its examples, and which
    example's loss was non-finite (found without a host sync per micro-batch)."""
    import solopo.training.loop.trainer as T

    real = T.OBJECTIVES["simpo"]

    def poisoned(batch, params):
        out = real(batch, params)
        out.loss = out.loss * torch.tensor([1.0, float("nan")] if out.loss.shape[0] == 2 else [1.0])
        return out

    monkeypatch.setitem(T.OBJECTIVES, "simpo", poisoned)
    with pytest.raises(TrainingError, match=r"at optimizer step 1, examples \[.*\] \(non-finite loss for \['q"):
        run(tmp_path, tiny_model_dir, algo="simpo", micro_batch_size=2, grad_accum=2)


def test_nonfinite_config_floats_rejected_with_other_problems():
    with pytest.raises(ConfigError) as e:
        build_config(
            None,
            [
                "train.lr=nan",
                "train.max_grad_norm=.inf",
                "sample.temperature=-inf",
                "train.micro_batch_size=0",
                "train.bogus=1",
            ],
        )
    msg = str(e.value)
    assert "5 config problem(s)" in msg
    for k in (
        "train.lr: must be a finite number",
        "train.max_grad_norm: must be a finite number",
        "sample.temperature: must be a finite number",
        "train.micro_batch_size",
        "train.bogus: unknown key",
    ):
        assert k in msg
    for v in ("nan", "NaN", "inf", "-Infinity"):
        with pytest.raises(ConfigError, match="finite"):
            build_config(None, [f"train.gamma={v}"])
    assert build_config(None, ["train.lr=1e-6"]).train.lr == 1e-6


# --- dropout ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models") / "tiny-dropout"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_dropout"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_dropout_off_by_default_dpo_starts_at_log2(tmp_path, dropout_model_dir):
    """The DPO reference is computed in eval mode: with dropout off (default, as TRL) the policy equals it at
    step 1 and the loss is log 2; keeping dropout (attention_dropout=0.5) moves it off log 2."""
    kw = dict(algo="dpo", mode="short", micro_batch_size=4, beta=1.0)
    off = run(tmp_path / "off", dropout_model_dir, **kw)
    first = log_rows(off["model_path"])[0]
    assert first["po_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["rewards/rejected"] == pytest.approx(
        0, abs=1e-5
    )
    assert any("dropout disabled" in n for n in off["notes"])
    on = run(tmp_path / "on", dropout_model_dir, **kw, disable_dropout=False)
    first = log_rows(on["model_path"])[0]
    assert abs(first["po_loss"] - math.log(2)) > 1e-4 and abs(first["rewards/chosen"]) > 1e-2
    assert any("dropout stays on" in n for n in on["notes"])


def test_disable_dropout_zeroes_modules_and_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            attention_dropout=0.3,
        )
    )
    m.extra = torch.nn.Dropout(0.2)
    assert disable_dropout(m) == 3  # 2 attention layers + 1 nn.Dropout
    assert m.extra.p == 0 and all(layer.self_attn.attention_dropout == 0 for layer in m.model.layers)


# --- logs.jsonl -----------------------------------------------------------------------------------------------
def test_rerun_starts_a_fresh_log(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, algo="simpo", mode="short", max_steps=3)
    b = run(tmp_path, tiny_model_dir, algo="simpo", mode="short", max_steps=3)
    assert [r["step"] for r in log_rows(b["model_path"])] == [1, 2, 3]  # not 1,2,3,1,2,3


# --- reference variants and modes ---------------------------------------------------------------------------------
def test_dpo_ra_reference_long_and_short(tmp_path, tiny_model_dir):
    """ra_ref=long: at step 1 the policy is pi_ref on x_long too, so |r_short - r_long| = 0 exactly (the long
    reference comes from the initial weights). ra_ref=short reuses pi_ref(y_w|x_short): then the step-1 distance
    is beta * |log pi_ref(y_w|x_long) - log pi_ref(y_w|x_short)|, hand-computed from the long run's cache."""
    long_ = run(tmp_path, tiny_model_dir, algo="dpo", ra_ref="long", micro_batch_size=4)
    first = log_rows(long_["model_path"])[0]
    assert first["ra_distance"] == pytest.approx(0.0, abs=1e-6) and first["po_loss"] == pytest.approx(math.log(2))
    caches = {p: pa.parquet.read_table(p).to_pylist() for p in (tmp_path / "ref_logps").glob("*.parquet")}
    (ref,) = caches.values()
    assert all(r["ref_long_w"] is not None for r in ref)
    short = run(tmp_path / "s", tiny_model_dir, algo="dpo", ra_ref="short", micro_batch_size=4)
    (short_cache,) = (tmp_path / "s" / "ref_logps").glob("*.parquet")
    assert all(r["ref_long_w"] is None for r in pa.parquet.read_table(short_cache).to_pylist())  # no long forward
    want = sum(0.1 * abs(r["ref_long_w"] - r["ref_chosen"]) for r in ref) / len(ref)
    got = log_rows(short["model_path"])[0]
    assert got["ra_distance"] == pytest.approx(want, rel=1e-4) and want > 0
    assert got["ra_loss"] == pytest.approx(3.0 * want, rel=1e-4)  # DPO's default alpha = 3


def test_mode_long_happy_path(tmp_path, tiny_model_dir):
    """Long-PO on pairs sampled on x_long; a row without one is dropped and counted."""
    rows = export_rows()
    for i, r in enumerate(rows):
        r["long_chosen_response"] = None if i == 3 else f"From the long context: Lyon. The answer is: Lyon{'!' * i}"
        r["long_rejected_response"] = None if i == 3 else "The answer is: Marseille"
    cfg_kw = dict(algo="dpo", mode="long", max_steps=2, micro_batch_size=2)
    from solopo.training.config import TrainConfig
    from solopo.training.loop.trainer import train

    base = {
        "lr": 1e-3,
        "grad_accum": 1,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "gradient_checkpointing": False,
        **cfg_kw,
    }
    res = train(
        TrainConfig(**base), model_path=str(tiny_model_dir), table=pa.Table.from_pylist(rows), out_dir=tmp_path, seed=0
    )
    assert res["steps"] == 2 and res["examples"] == 3 and res["alpha"] == 0.0
    assert res["drops"] == {"no_long_pair": ["q3#0"]}
    logs = log_rows(res["model_path"])
    assert logs[0]["po_loss"] == pytest.approx(math.log(2), abs=1e-5) and logs[0]["ra_loss"] == 0
    assert all(math.isfinite(r["loss"]) for r in logs)


# --- the saved model: dtype, HF trainer files, card ------------------------------------------------------------
def saved_dtypes(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            out |= {str(s.get_slice(k).get_dtype()) for k in s.keys()}
    return out


def test_weights_saved_in_training_dtype(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    bf = run(tmp_path / "bf", tiny_model_dir, algo="simpo", mode="short", dtype="bf16")
    d = Path(bf["model_path"])
    assert saved_dtypes(d) == {"BF16"} and bf["save_dtype"] == "bfloat16"
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    m = AutoModelForCausalLM.from_pretrained(d, dtype="auto")
    assert m.dtype == torch.bfloat16 and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    f32 = run(tmp_path / "f32", tiny_model_dir, algo="simpo", mode="short", dtype="bf16", save_dtype="fp32")
    d32 = Path(f32["model_path"])
    assert saved_dtypes(d32) == {"F32"} and json.loads((d32 / "config.json").read_text())["dtype"] == "float32"
    # the fp32 copy holds exactly the bf16-trained values
    w16, w32 = m.state_dict(), AutoModelForCausalLM.from_pretrained(d32).state_dict()
    assert all(torch.equal(w16[k].float(), w32[k]) for k in w16)


def test_trainer_state_and_all_results_use_hf_keys(tmp_path, tiny_model_dir):
    import dataclasses

    from transformers import TrainerState

    res = run(tmp_path, tiny_model_dir, algo="dpo", max_steps=3, micro_batch_size=2, logging_steps=2)
    d = Path(res["model_path"])
    state = json.loads((d / "trainer_state.json").read_text())
    assert set(state) == {f.name for f in dataclasses.fields(TrainerState)}
    loaded = TrainerState.load_from_json(str(d / "trainer_state.json"))
    assert loaded.global_step == 3 and loaded.max_steps == 3 and loaded.epoch == pytest.approx(1.5)
    steps = [h["step"] for h in loaded.log_history]
    assert steps == [2, 3, 3]  # logging_steps=2, the last step, then HF's end-of-training summary
    row = loaded.log_history[0]
    for k in (
        "loss",
        "grad_norm",
        "learning_rate",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "epoch",
    ):
        assert k in row
    assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"])
    assert "train_runtime" in loaded.log_history[-1] and "train_loss" in loaded.log_history[-1]
    results = json.loads((d / "all_results.json").read_text())
    assert results == json.loads((d / "train_results.json").read_text())
    every_step = pa.parquet.read_table(d / "history.parquet").column("loss").to_pylist()
    assert len(every_step) == 3 and results["train_loss"] == pytest.approx(sum(every_step) / 3)  # HF: mean over steps
    assert {
        "epoch",
        "total_flos",
        "train_loss",
        "train_runtime",
        "train_samples",
        "train_samples_per_second",
        "train_steps_per_second",
    } <= set(results)
    assert results["train_samples"] == 4 and results["total_flos"] > 0
    assert not (d / "train_result.json").exists()


def test_add_eval_results_replaces_its_section(tmp_path):
    from huggingface_hub import ModelCard

    from solopo.training.model_card import add_eval_results, write_model_card

    result = {
        "algo": "orpo",
        "mode": "solo",
        "alpha": 1.0,
        "beta": 0.0,
        "steps": 3,
        "examples": 4,
        "target_len": 1024,
        "dtype": "bfloat16",
        "final": {"loss": 1.25, "reward_acc": 0.5},
    }
    write_model_card(
        tmp_path,
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        result=result,
        train_config={"lr": 1e-6, "micro_batch_size": 1, "grad_accum": 2},
        datasets=["musique"],
        license="apache-2.0",
    )
    add_eval_results(tmp_path, [{"length": "4k", "sub_em_%": 10.0, "n": 8}], notes="sub-EM, percent")
    add_eval_results(tmp_path, [{"length": "4k", "sub_em_%": 12.5, "n": 8}, {"length": "8k", "sub_em_%": 0.0}])
    text = (tmp_path / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert text.count("## Evaluation") == 1 and "| 4k | 12.5 | 8 |" in text and "| 8k | 0 |  |" in text
    assert "10.0" not in text and "percent" not in text  # the second call replaced the first
    assert text.index("## Evaluation") < text.index("## How to load")


# --- eval never scores a question the model was trained on ---------------------------------------------------
def test_eval_excludes_training_ids(tmp_path, tokenizer):
    """Ids in the run's load output and in eval.exclude_from are dropped (and counted) from the eval set."""
    from solopo.pipeline.io import write_parquet
    from solopo.pipeline.runner import Pipeline
    from solopo.stages.evaluate import EvalStage

    lines = (SHARED / "data" / "musique" / "musique_ans_dev_sample.jsonl").read_text().splitlines()[:4]
    src = tmp_path / "dev.jsonl"
    src.write_text("\n".join(lines) + "\n")
    ids = [json.loads(x)["id"] for x in lines]
    run_dir = tmp_path / "run"
    write_parquet(pa.table({"id": ids[:2]}), run_dir / "load" / "data.parquet")  # trained on in this run
    write_parquet(pa.table({"id": [ids[2]]}), tmp_path / "other.parquet")  # trained on elsewhere
    cfg = build_config(
        None,
        [
            f"run.run_dir={run_dir}",
            "eval.datasets=[musique]",
            f"eval.musique_source={src}",
            "eval.n_questions=4",
            "eval.lengths=1k",
            f"eval.exclude_from={tmp_path / 'other.parquet'}",
        ],
    )
    ctx = Pipeline([EvalStage], cfg)._context(EvalStage)
    evalset = EvalStage(cfg.eval, ctx)._eval_set(tokenizer)
    assert set(evalset.column("id").to_pylist()) == {ids[3]}
    assert ctx.drops["musique:overlaps_training_ids"] == 3


# --- issue 20 items 5-7, issue 21 items 3-4: context, checkpoints, full disk, the reference cache -----------------
def test_examples_over_the_model_context_are_dropped_with_a_note(tmp_path, tiny_model_dir):
    """A 150-token context: the longer x_long rows are dropped (counted, with a note) instead of training past the
    positions the model knows; with none left the run fails saying why."""
    d = tmp_path / "ctx150"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 150}))
    res = run(tmp_path / "a", d, algo="orpo")
    dropped = res["drops"]["over_model_context"]
    assert 0 < len(dropped) < 4 and res["examples"] == 4 - len(dropped)
    assert any(
        f"{len(dropped)} example(s) have a sequence longer than the model's context of 150" in n for n in res["notes"]
    )
    (d / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 40}))
    with pytest.raises(SolopoError, match=r"no training examples left .*'over_model_context': 4"):
        run(tmp_path / "b", d, algo="orpo")


def test_checkpoints_by_time_by_default_and_kept_across_non_math_settings(tmp_path, tiny_model_dir):
    """save_steps unset (the default) checkpoints every save_minutes; a rerun that changes only logging_steps,
    report_to or save_steps resumes from them, keeping the newest save_total_limit (2)."""
    from solopo.training.config import TrainConfig

    assert TrainConfig().save_steps is None and TrainConfig().save_minutes == 10.0
    with killed_in_step(4):
        run(tmp_path, tiny_model_dir, algo="orpo", max_steps=4, save_minutes=1e-9)  # due after every step
    ckpt = tmp_path / "models" / "orpo-solo.checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2", "step-3"]
    res = run(tmp_path, tiny_model_dir, algo="orpo", max_steps=4, save_steps=5, logging_steps=2)
    assert any(f"resumed from checkpoint {ckpt / 'step-3'} at step 3" in n for n in res["notes"]), res["notes"]
    assert res["steps"] == 4 and not ckpt.exists()


def test_damaged_checkpoints_are_skipped_for_the_last_good_one(tmp_path, tiny_model_dir):
    """Truncated state.pt, garbage solopo.json, a stray step-3.bak and a leftover step-9.tmp: each is skipped (the
    temp dir silently removed) and the run resumes from step 1, the last good checkpoint; no note blames another
    config."""
    with killed_in_step(4):
        run(tmp_path, tiny_model_dir, algo="orpo", max_steps=4, save_steps=1, save_total_limit=0)
    ckpt = tmp_path / "models" / "orpo-solo.checkpoints"
    os.truncate(ckpt / "step-3" / "state.pt", 1000)
    (ckpt / "step-2" / "solopo.json").write_text("{garbage")
    shutil.copytree(ckpt / "step-1", ckpt / "step-3.bak")
    (ckpt / "step-9.tmp").mkdir()
    res = run(tmp_path, tiny_model_dir, algo="orpo", max_steps=4, save_steps=1, save_total_limit=0)
    notes = "\n".join(res["notes"])
    assert f"skipping damaged checkpoint {ckpt / 'step-3'} (RuntimeError" in notes
    assert f"skipping damaged checkpoint {ckpt / 'step-2'}: solopo.json is unreadable" in notes
    assert f"ignoring {ckpt / 'step-3.bak'}: not a checkpoint solopo wrote" in notes
    assert f"resumed from checkpoint {ckpt / 'step-1'} at step 1" in notes
    assert "another config" not in notes and "step-9.tmp" not in notes and res["steps"] == 4


def test_only_a_leftover_temp_checkpoint_starts_at_step_0_without_blame(tmp_path, tiny_model_dir):
    ckpt = tmp_path / "models" / "orpo-solo.checkpoints"
    (ckpt / "step-1.tmp").mkdir(parents=True)
    res = run(tmp_path, tiny_model_dir, algo="orpo", max_steps=1)
    assert not any("another config" in n or "resumed" in n for n in res["notes"]), res["notes"]


def test_full_disk_at_a_checkpoint_and_at_the_final_save(tmp_path, tiny_model_dir, monkeypatch):
    """Both are the storage message ("no space left ... rerun the same command"), and no temp dir survives."""
    import errno

    import safetensors

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(
        RunDirError, match=r"cannot write .*step-1: no space left on the device.*rerun the same command"
    ):
        run(tmp_path, tiny_model_dir, algo="orpo", max_steps=2, save_steps=1)
    monkeypatch.undo()
    models = tmp_path / "models"
    assert [p.name for p in models.rglob("*")] == ["orpo-solo.checkpoints"]  # no step-1(.tmp), no .orpo-solo.*

    from transformers import PreTrainedModel

    def full(self, *a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(RunDirError, match=r"cannot write .*orpo-solo: no space left on the device"):
        run(tmp_path, tiny_model_dir, algo="orpo", max_steps=1)
    assert not [p for p in models.iterdir() if p.name.startswith(".")]


def test_dpo_reference_cache_is_verified_and_recomputed_when_damaged(tmp_path, tiny_model_dir):
    """The cache carries its sha256 record: +50 on ref_chosen (the issue's repro: loss 20 trained silently) or a
    truncated file is recomputed with a note, and DPO's first loss is log 2 again."""
    run(tmp_path, tiny_model_dir, algo="dpo")
    (cache,) = (tmp_path / "ref_logps").glob("*.parquet")
    assert json.loads(Path(f"{cache}.json").read_text())["rows"] == 4
    t = pa.parquet.read_table(cache)
    bumped = t.set_column(
        t.schema.get_field_index("ref_chosen"), "ref_chosen", pa.array([v + 50 for v in t["ref_chosen"].to_pylist()])
    )
    for damage in (lambda: pa.parquet.write_table(bumped, cache), lambda: os.truncate(cache, 100)):
        damage()
        res = run(tmp_path, tiny_model_dir, algo="dpo")
        assert any(f"DPO reference log-prob cache {cache} is damaged" in n for n in res["notes"]), res["notes"]
        assert log_rows(res["model_path"])[0]["po_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_real_full_tmpfs_at_a_checkpoint_and_at_the_final_save(tmp_path, tiny_model_dir):
    """On a real full disk torch.save raises its errno-less zip-writer RuntimeError (also through a Python file):
    the free space left decides, and the message is the storage one. Needs root for a small tmpfs."""
    import subprocess

    for size, kw, where in (
        ("30m", {"save_steps": 1, "max_steps": 2}, "step-1"),
        ("8m", {"save_steps": 0}, "orpo-solo"),
    ):
        d = tmp_path / size
        d.mkdir()
        if (
            os.geteuid() != 0
            or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)]).returncode
        ):
            pytest.skip("needs root to mount a small tmpfs")
        try:
            with pytest.raises(
                RunDirError, match=rf"cannot write .*{where}: no space left on the device.*rerun the same"
            ):
                run(d, tiny_model_dir, algo="orpo", **kw)
            assert [p.relative_to(d).as_posix() for p in d.rglob("*") if p.name.startswith((".", "step-"))] == []
        finally:
            subprocess.run(["umount", "-l", str(d)], check=True)  # lazy: the failed writer may hold a file until gc
