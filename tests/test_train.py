"""The training loop on the tiny 2-layer model: exact gradient accumulation, modes, guards, checkpoints/resume,
a run under DeepSpeed ZeRO-3 on CPU (gloo), and the real `solopo train` CLI over a prebuilt export table."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from solopo.pipeline.errors import DataError
from solopo.training.config import TrainConfig
from solopo.training.loop.trainer import train

REPO = Path(__file__).resolve().parents[1]


def export_rows(n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        doc = f"Document 1 (Title: T{i}): Item {i} was made in Lyon, France."
        q = f"Question: Where was item {i} made?"
        rows.append(
            {
                "id": f"q{i}",
                "pair_index": 0,
                "target_len": 1024,
                "question": q,
                "answers": ["Lyon"],
                "dataset": "musique",
                "short_prompt": f"{doc}\n\n{q}",
                "long_prompt": "\n\n".join(["Document 0 (Title: F): " + "filler words " * (20 + 7 * i), doc])
                + f"\n\n{q}",
                "chosen_response": f"Item {i} was made in Lyon. The answer is: Lyon",
                "rejected_response": "It was made in Paris" + " maybe" * i + ". The answer is: Paris",
                "short_tokens": 60,
                "long_tokens": 200 + 10 * i,
                "rho": 0.3,
            }
        )
    return rows


def run(tmp, tiny, **kw):
    cfg = TrainConfig(
        **{
            "max_steps": 1,
            "lr": 1e-3,
            "micro_batch_size": 1,
            "grad_accum": 1,
            "max_grad_norm": 1e9,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "gradient_checkpointing": False,
            **kw,
        }
    )
    return train(cfg, model_path=str(tiny), table=pa.Table.from_pylist(export_rows()), out_dir=tmp, seed=0)


@contextlib.contextmanager
def killed_in_step(n: int):
    """The training run inside dies in optimizer step n (after step n-1's checkpoint), like a killed process."""
    import solopo.training.loop.step as T  # _Agg lives with the step

    real, calls = T._Agg.finish, {"n": 0}

    def crash(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    T._Agg.finish = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        T._Agg.finish = real


def weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("algo", ["orpo", "simpo"])
def test_gradient_accumulation_equivalence(tmp_path, tiny_model_dir, algo):
    """4 examples in one micro-batch == 4 micro-batches of 1: same loss, same gradient norm, same weights."""
    a = run(tmp_path / "a", tiny_model_dir, algo=algo, micro_batch_size=4, grad_accum=1, gradient_checkpointing=True)
    b = run(tmp_path / "b", tiny_model_dir, algo=algo, micro_batch_size=1, grad_accum=4)
    ha = json.loads((Path(a["model_path"]) / "logs.jsonl").read_text().splitlines()[0])
    hb = json.loads((Path(b["model_path"]) / "logs.jsonl").read_text().splitlines()[0])
    assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-5)
    assert ha["grad_norm"] == pytest.approx(hb["grad_norm"], rel=1e-4) and ha["grad_norm"] > 0
    wa, wb = weights(a["model_path"]), weights(b["model_path"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)  # Adam divides by |g|: tiny g amplifies fp noise
    assert any(not torch.equal(wa[k], v) for k, v in weights(tiny_model_dir).items())  # it did train


def test_modes_and_outputs(tmp_path, tiny_model_dir):
    solo = run(tmp_path, tiny_model_dir, algo="simpo", mode="solo", max_steps=2, micro_batch_size=2)
    short = run(tmp_path, tiny_model_dir, algo="simpo", mode="short", max_steps=2, micro_batch_size=2)
    exp = run(tmp_path, tiny_model_dir, algo="simpo", mode="expand-long", max_steps=1, micro_batch_size=2)
    assert solo["alpha"] == 1.0 and short["alpha"] == 0.0 and exp["alpha"] == 0.0
    assert solo["final"]["ra_loss"] > 0 and short["final"]["ra_loss"] == 0
    # models of different modes sit side by side and load with transformers
    for r in (solo, short, exp):
        assert Path(r["model_path"]).name in ("simpo-solo", "simpo-short", "simpo-expand-long")
        assert (Path(r["model_path"]) / "training_curves.png").exists()
        weights(r["model_path"])
    # solo processes the long+chosen sequence too
    assert solo["final"]["ra_distance"] > 0


def test_long_mode_needs_long_pairs(tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match="sample.on=both"):
        run(tmp_path, tiny_model_dir, mode="long")


def test_dpo_reference_is_cached(tmp_path, tiny_model_dir):
    a = run(tmp_path, tiny_model_dir, algo="dpo")
    cache = list((tmp_path / "ref_logps").glob("*.parquet"))
    assert len(cache) == 1 and pa.parquet.read_table(cache[0]).num_rows == 4
    # at the first step the policy is the reference: DPO's first loss is exactly log 2
    first = json.loads((Path(a["model_path"]) / "logs.jsonl").read_text().splitlines()[0])
    assert first["po_loss"] == pytest.approx(0.693147, abs=1e-5)
    b = run(tmp_path, tiny_model_dir, algo="dpo", ra_ref="long")
    assert any("loaded from the cache" in n for n in b["notes"])


def test_checkpoint_resume(tmp_path, tiny_model_dir):
    """A run interrupted after a checkpoint resumes there and ends with the same weights as an uninterrupted run;
    its logs.jsonl continues the checkpoint's rows (step 3 was logged before the kill and is redone: logged once)."""
    full = run(tmp_path / "full", tiny_model_dir, algo="orpo", max_steps=4, save_steps=2)
    part = tmp_path / "part"
    with killed_in_step(4):
        run(part, tiny_model_dir, algo="orpo", max_steps=4, save_steps=2)
    assert (part / "models" / "orpo-solo.checkpoints" / "step-2").exists()
    # the killed run's logs lived in its staging dir, removed with it: no model dir, no temp dir
    assert sorted(p.name for p in (part / "models").iterdir()) == ["orpo-solo.checkpoints"]
    logs = part / "models" / "orpo-solo" / "logs.jsonl"
    resumed = run(part, tiny_model_dir, algo="orpo", max_steps=4, save_steps=2)
    assert any("resumed from checkpoint" in n for n in resumed["notes"]) and resumed["steps"] == 4
    assert [json.loads(x)["step"] for x in logs.read_text().splitlines()] == [1, 2, 3, 4]
    wf, wr = weights(full["model_path"]), weights(resumed["model_path"])
    for k in wf:
        torch.testing.assert_close(wf[k], wr[k], rtol=1e-5, atol=1e-7)


# --- the real CLI over a prebuilt export table --------------------------------------------------------------
def write_export_chain(run_dir: Path, overrides: list[str]) -> None:
    """Mark load..select as finished and write export's table, with the executor's own keys, so that
    `solopo train` finds a valid _SUCCESS chain and runs only the train stage."""
    from solopo.api import build_config
    from solopo.pipeline.config import config_to_dict
    from solopo.pipeline.io import stable_hash, write_json, write_parquet
    from solopo.pipeline.runner import Pipeline
    from solopo.stages import chain

    cfg = build_config(None, overrides)
    pipe = Pipeline(chain("export"), cfg)
    up = None
    for cls in chain("export"):
        stage = cls(getattr(cfg, cls.name), pipe._context(cls))
        key = stable_hash(
            {
                "stage": cls.name,
                "version": cls.version,
                "config": config_to_dict(getattr(cfg, cls.name)),
                "run": {"model": cfg.run.model, "seed": cfg.run.seed},
                "upstream": up,
                "fingerprint": stage.fingerprint(),
            }
        )
        d = run_dir / cls.name
        d.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(export_rows()) if cls.name == "export" else pa.table({"id": ["x"]})
        write_parquet(table, d / "data.parquet")
        write_json({"stage": cls.name, "key": key, "rows_out": table.num_rows}, d / "manifest.json")
        (d / "_SUCCESS").write_text(key + "\n")
        up = key


def test_cli_train_recipe(tmp_path, tiny_model_dir, keep_logging):
    from typer.testing import CliRunner

    from solopo.cli import app

    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={tiny_model_dir}"]
    write_export_chain(run_dir, common)
    sets = [x for c in common for x in ("--set", c)]
    args = ["train", "--algo", "orpo", *sets, "--set", "train.max_steps=2", "--set", "train.grad_accum=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = pa.parquet.read_table(run_dir / "train" / "data.parquet").to_pylist()[0]
    assert out["algo"] == "orpo" and out["mode"] == "solo" and out["alpha"] == 1.0 and out["steps"] == 2
    assert out["model_path"] == "train/models/orpo-solo"  # relative to the run dir
    out["model_path"] = str(run_dir / out["model_path"])
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, TrainerState

    m = AutoModelForCausalLM.from_pretrained(out["model_path"])
    assert m.config.num_hidden_layers == 2
    # the model card (HF format), validated by huggingface_hub, and HF Trainer's state/results files
    card = ModelCard.load(Path(out["model_path"]) / "README.md")
    # a local checkpoint has no hub id: named in the text, kept out of base_model; no machine path anywhere
    assert card.data.base_model is None and "`tiny-llama`" in card.text and str(tiny_model_dir) not in str(card)
    # datasets by Hub id (the data card's source_datasets id); no `trl` tag: solopo's own loop trained it
    assert card.data.library_name == "transformers" and card.data.datasets == ["dgslibisey/MuSiQue"]
    assert {"solopo", "orpo"} <= set(card.data.tags) and "trl" not in card.data.tags
    assert card.data.license is None  # unknown: not invented
    for fact in (
        "| algorithm | orpo |",
        "| mode | solo |",
        "| alpha (SoLo-RA weight) | 1.0 |",
        "| beta | 0.0 |",
        "| orpo_lambda | 0.1 |",
        "| optimizer steps | 2 |",
        "| training examples | 4 |",
        "## Final training metrics",
        "| reward_acc |",
        "AutoModelForCausalLM.from_pretrained",
    ):
        assert fact in card.text, fact
    assert TrainerState.load_from_json(str(Path(out["model_path"]) / "trainer_state.json")).global_step == 2
    assert json.loads((Path(out["model_path"]) / "all_results.json").read_text())["train_samples"] == 4
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["stats"]["steps"] == 2 and "final_loss" in manifest["stats"]
    # an unchanged rerun is a no-op
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "cached" in res.output


def test_deepspeed_zero3_cpu(tmp_path, tiny_model_dir):
    """`solopo train` under DeepSpeed ZeRO-3 on one CPU process (gloo), in a subprocess so the process group does
    not leak into other tests; the same steps without DeepSpeed give the same losses."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    common = [f"run.run_dir={run_dir}", f"run.model={tiny_model_dir}"]
    write_export_chain(run_dir, common)
    sets = [
        *common,
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        "train.lr=1e-3",
        "train.deepspeed=zero3",
        "train.gradient_checkpointing=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "solopo.cli", "train", "--algo", "dpo"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed zero3" in proc.stderr
    ds = [json.loads(x) for x in (run_dir / "train" / "models" / "dpo-solo" / "logs.jsonl").read_text().splitlines()]
    plain = run(
        tmp_path / "plain",
        tiny_model_dir,
        algo="dpo",
        max_steps=2,
        micro_batch_size=2,
        warmup_ratio=0.1,
        lr_scheduler="cosine",
        max_grad_norm=1.0,
    )
    hp = [json.loads(x) for x in (Path(plain["model_path"]) / "logs.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ds] == pytest.approx([r["loss"] for r in hp], rel=1e-4)
    weights(run_dir / "train" / "models" / "dpo-solo")  # the ZeRO-3 model was gathered and saved in HF format


def test_log_lines_do_not_run_into_the_progress_bar(tmp_path, tiny_model_dir, keep_logging, monkeypatch):
    """issue 26: a log line during the loop goes through tqdm.write (the bar is cleared, the line printed, the bar
    redrawn), so on the console no step line starts after the bar's text on the same line."""
    import io
    import logging

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)  # tqdm and the handler below both write to sys.stderr
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(sys.stderr)]
    root.setLevel(logging.INFO)
    run(tmp_path, tiny_model_dir, algo="simpo", max_steps=2, logging_steps=1)
    text = err.getvalue()
    step_lines = [ln for ln in text.split("\n") if "[train] step" in ln]
    assert len(step_lines) == 2, text
    # what is visible of a console line is what follows its last carriage return
    assert all(ln.split("\r")[-1].startswith("[train] step") for ln in step_lines), step_lines
