"""sample -> select -> export on a hand-made synth output with a scripted backend: Parquet schema round
trip (pyarrow and datasets), TRL and LLaMA-Factory views, data card with YAML metadata and PNG plots."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import solopo.backends as backends
from solopo.backends import Generation
from solopo.pipeline.config import build_config
from solopo.pipeline.io import read_json, write_parquet
from solopo.pipeline.runner import Pipeline
from solopo.prompts import render_document, render_prompt
from solopo.stages.export import EXPORT_SCHEMA, ExportStage
from solopo.stages.sample import SampleStage
from solopo.stages.select import SelectStage

N_Q = 6  # q0..q5: q0 all wrong, q1 all correct, the others mixed


def synth_rows(lengths=(4096, 8192)) -> list[dict]:
    rows = []
    for i in range(N_Q):
        q = f"Where was person {i} born?"
        gold = render_document(1, f"Person {i}", f"Person {i} was born in City{i}.")
        for tl in lengths:
            filler = [render_document(k, f"Filler {k}", f"filler text {k} " * (tl // 512)) for k in range(2, 6)]
            rows.append(
                {
                    "id": f"q{i}",
                    "question": q,
                    "answers": [f"City{i}", f"City {i} (town)"],
                    "short_prompt": render_prompt([gold], q),
                    "long_prompt": render_prompt([*filler[:2], gold, *filler[2:]], q),
                    "short_tokens": 60 + i,
                    "long_tokens": tl - 100 + i,
                    "target_len": tl,
                    "gold_positions": [2],
                    "n_docs": 5,
                    "rho": (60 + i) / (tl - 100 + i),
                    "dataset": "musique",
                }
            )
    return rows


class ScriptedBackend:
    """Answers by sample index: correct for even j, wrong for odd j; q0 always wrong, q1 always right."""

    name = "scripted"
    max_context = None

    def prompt_lengths(self, prompts):
        return [len(p.split()) for p in prompts]

    def generate(self, prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        out = []
        for p in prompts:
            i = int(re.search(r"person (\d+) born", p).group(1))
            where = "long" if "filler" in p else "short"
            gens = []
            for j in range(n):
                right = i == 1 or (i != 0 and j % 2 == 0)
                city = f"City{i}" if right else "Atlantis"
                gens.append(Generation(f"({where} {j}) Document 1 mentions it.\nThe answer is: {city}", "stop", 9 + j))
            out.append(gens)
        if progress:
            progress(len(prompts), 0)
        return out

    def close(self):
        pass


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "get_backend", lambda *a, **k: ScriptedBackend())
    d = tmp_path / "run"
    write_parquet(pa.Table.from_pylist(synth_rows()), d / "synth" / "data.parquet")
    (d / "synth" / "_SUCCESS").write_text("fake-synth-key\n")
    return d


def run_chain(run_dir, tiny_model_dir, **sample):
    cfg = build_config(
        overrides={
            "run": {"run_dir": str(run_dir), "model": str(tiny_model_dir)},
            "sample": {"n": 4, "max_tokens": 16, **sample},
            "select": {"pairs_per_question": 2},
        }
    )
    return Pipeline([SampleStage, SelectStage, ExportStage], cfg).run()


def test_export_schema_round_trip_and_views(run_dir, tiny_model_dir):
    summary = run_chain(run_dir, tiny_model_dir)
    exp = run_dir / "export"
    # 4 mixed questions x 2 pairs x 2 lengths
    assert summary["export"]["rows"] == 16
    assert pq.read_schema(exp / "data.parquet").remove_metadata().equals(EXPORT_SCHEMA)
    t = pq.read_table(exp / "data.parquet")
    rows = t.to_pylist()
    assert {r["id"] for r in rows} == {"q2", "q3", "q4", "q5"}
    r = next(x for x in rows if x["id"] == "q3" and x["target_len"] == 8192 and x["pair_index"] == 0)
    assert r["chosen_answer"] == "City3" and r["rejected_answer"] == "Atlantis"
    assert r["long_prompt"].count("Document") == 5 and r["short_prompt"].count("Document") == 1
    assert (r["short_tokens"], r["long_tokens"], r["n_docs"], r["gold_positions"]) == (63, 8095, 5, [2])
    assert r["rho"] == pytest.approx(63 / 8095, rel=1e-6)
    assert r["chosen_tokens"] > 5 and r["rejected_tokens"] > 5
    assert (r["n_samples"], r["n_valid"], r["n_correct"], r["pass_rate"]) == (4, 4, 2, 0.5)
    assert (r["sample_backend"], r["sample_max_tokens"], r["policy"]) == ("scripted", 16, "random")
    assert r["long_chosen"] is None  # sampled on short only

    # datasets reads it with the same columns and rows
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(exp / "data.parquet"), split="train")
    assert ds.num_rows == 16 and ds.column_names == EXPORT_SCHEMA.names
    assert ds[0]["answers"] and isinstance(ds[0]["gold_positions"], list)

    # TRL conversational views: short deduplicated over lengths, one long view per length
    short = load_dataset("parquet", data_files=str(exp / "trl" / "short.parquet"), split="train")
    assert short.num_rows == 8
    ex = short[0]
    assert ex["prompt"][0]["role"] == "user" and ex["chosen"][0]["role"] == "assistant"
    assert "Filler" not in ex["prompt"][0]["content"]
    long8 = pq.read_table(exp / "trl" / "long-8k.parquet")
    assert long8.num_rows == 8
    assert "Filler" in long8.column("prompt").to_pylist()[0][0]["content"]
    assert not (exp / "trl" / "longpo-8k.parquet").exists()

    # LLaMA-Factory entries point at files next to dataset_info.json
    info = json.loads((exp / "llamafactory" / "dataset_info.json").read_text())
    assert set(info) == {"solopo_short", "solopo_long_4k", "solopo_long_8k"}
    for entry in info.values():
        assert entry["ranking"] is True and entry["formatting"] == "alpaca"
        lf = pq.read_table(exp / "llamafactory" / entry["file_name"])
        assert {"instruction", "input", "chosen", "rejected"} <= set(lf.column_names)


def test_data_card_and_plots(run_dir, tiny_model_dir):
    run_chain(run_dir, tiny_model_dir)
    exp = run_dir / "export"
    card = (exp / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0"
    assert meta["source_datasets"] == ["musique"]
    assert meta["configs"][0]["data_files"][0]["path"] == "data.parquet"
    assert "CC BY 4.0" in card and "MuSiQue" in card and "trivedi2022musique" in card
    # counts, pass rates and drops by reason from the upstream manifests
    assert "| all_correct | 1 |" in card and "| all_wrong | 1 |" in card
    sel = read_json(run_dir / "select" / "manifest.json")
    assert f"| sample pass rate (correct / valid samples) | {sel['stats']['sample_pass_rate']} |" in card
    assert "| pairs | 8 |" in card and "| questions exported | 4 |" in card
    assert "n=4 at T=0.85" in card  # the reduction from the paper's 32 samples is stated
    assert "${" not in card
    for name in ("short_prompt_tokens.png", "long_prompt_tokens.png", "response_tokens.png"):
        png = exp / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in card


def test_long_po_pairs_exported(run_dir, tiny_model_dir):
    run_chain(run_dir, tiny_model_dir, on="both")
    exp = run_dir / "export"
    t = pq.read_table(exp / "data.parquet").to_pylist()
    r = next(x for x in t if x["id"] == "q2" and x["target_len"] == 4096 and x["pair_index"] == 0)
    assert r["long_chosen"].startswith("(long ") and r["long_chosen"].endswith("City2")
    assert r["long_rejected"].endswith("Atlantis")
    assert r["chosen"].startswith("(short ")
    lp = pq.read_table(exp / "trl" / "longpo-4k.parquet").to_pylist()
    assert len(lp) == 8 and lp[0]["chosen"][0]["content"].startswith("(long ")
    info = json.loads((exp / "llamafactory" / "dataset_info.json").read_text())
    assert "solopo_longpo_8k" in info


def test_export_rejects_synth_without_required_columns(run_dir, tiny_model_dir):
    rows = synth_rows()
    for r in rows:
        del r["rho"]
    write_parquet(pa.Table.from_pylist(rows), run_dir / "synth" / "data.parquet")
    from solopo.pipeline.errors import DataError

    with pytest.raises(DataError, match="rho"):
        run_chain(run_dir, tiny_model_dir)
