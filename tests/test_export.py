"""sample -> select -> export on a hand-made synth output with a scripted backend: Parquet schema round
trip (pyarrow and datasets), TRL and LLaMA-Factory views, data card with YAML metadata and PNG plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import solopo.backends as backends
from solopo.api import build_config
from solopo.backends import Generation
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
    assert r["long_chosen_response"] is None  # sampled on short only

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

    assert "target_len" not in short.column_names  # x_short has no length
    assert long8.column("target_len").to_pylist() == [8192] * 8
    # no machine path in the data: the sampler is named by its checkpoint directory
    assert set(t.column("sampler_model").to_pylist()) == {tiny_model_dir.name}

    # LLaMA-Factory entries point at files next to dataset_info.json
    info = json.loads((exp / "llamafactory" / "dataset_info.json").read_text())
    assert set(info) == {"solopo_short", "solopo_long_4k", "solopo_long_8k"}
    for entry in info.values():
        assert entry["ranking"] is True and entry["formatting"] == "alpaca"
        lf = pq.read_table(exp / "llamafactory" / entry["file_name"])
        assert set(entry["columns"].values()) <= set(lf.column_names)
    assert "target_len" not in pq.read_schema(exp / "llamafactory" / "solopo_short.parquet").names


def test_data_card_and_plots(run_dir, tiny_model_dir):
    run_chain(run_dir, tiny_model_dir)
    exp = run_dir / "export"
    card = (exp / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0"
    assert meta["source_datasets"] == ["dgslibisey/MuSiQue"]
    assert meta["configs"][0] == {"config_name": "triplets", "data_files": [{"split": "train", "path": "data.parquet"}]}
    assert "CC BY 4.0" in card and "MuSiQue" in card and "trivedi2022musique" in card
    assert "Answer matching: " in card and "sub-EM" in card
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
    assert r["long_chosen_response"].startswith("(long ") and r["long_chosen_response"].endswith("City2")
    assert r["long_rejected_response"].endswith("Atlantis")
    assert r["chosen_response"].startswith("(short ")
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


# --- the views as the real clients read them (TRL 1.16, datasets, LLaMA-Factory's dataset_info schema) ---------
@pytest.fixture(scope="module")
def both_export(tmp_path_factory, tiny_model_dir):
    """One export with every kind of view (short, long-<len>, longpo-<len>) over a MuSiQue + HotpotQA mix, whose
    upstream manifests hold machine paths (as a real load of a local file records them)."""
    d = tmp_path_factory.mktemp("both") / "run"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def count(content):  # as synth counts: chat template + generation prompt
        msgs = [{"role": "user", "content": content}]
        return len(
            tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )

    rows = synth_rows()
    for r in rows:
        r["dataset"] = "hotpotqa" if r["id"] in ("q3", "q5") else "musique"
        r["short_tokens"], r["long_tokens"] = count(r["short_prompt"]), count(r["long_prompt"])
    write_parquet(pa.Table.from_pylist(rows), d / "synth" / "data.parquet")
    (d / "synth" / "_SUCCESS").write_text("fake-synth-key\n")
    source = str(d.parent / "data" / "musique_ans_train_sample.jsonl")
    load_manifest = {
        "rows_out": N_Q,
        "stats": {"dataset": "musique", "source": source},
        "notes": [f"load.limit={N_Q}: kept the first {N_Q} records of {source}"],
    }
    (d / "load").mkdir(parents=True)
    (d / "load" / "manifest.json").write_text(json.dumps(load_manifest))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "get_backend", lambda *a, **k: ScriptedBackend())
        cfg = build_config(
            overrides={
                "run": {"run_dir": str(d), "model": str(tiny_model_dir)},
                "load": {"source": source},
                "sample": {"n": 4, "max_tokens": 16, "on": "both"},
                "select": {"pairs_per_question": 2},
            }
        )
        Pipeline([SampleStage, SelectStage, ExportStage], cfg).run()
    return d / "export"


def _tables(exp):
    return sorted(p.relative_to(exp).as_posix() for p in exp.rglob("*.parquet"))


def _dpo(tiny_model_dir, tokenizer, path, tmp_path, max_length=1024):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    ds = load_dataset("parquet", data_files=str(path), split="train")
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=1,
        max_length=max_length,
        save_strategy="no",
        bf16=False,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)


def test_trl_dpo_on_every_exported_table(both_export, tiny_model_dir, tokenizer, tmp_path):
    """Every Parquet file of the export either trains in TRL's DPOTrainer exactly what the card says (the documented
    prompt and response, no row dropped at the card's max_length, the card's longest length = TRL's) or is refused."""
    import math

    from solopo.training.data import encode

    exp = both_export
    tables = _tables(exp)
    assert {
        "data.parquet",
        "trl/short.parquet",
        "trl/long-8k.parquet",
        "trl/longpo-8k.parquet",
        "llamafactory/solopo_short.parquet",
        "llamafactory/solopo_longpo_4k.parquet",
    } <= set(tables)
    stats = read_json(exp / "manifest.json")["stats"]["views"]
    card = (exp / "README.md").read_text()
    triplets = {(r["id"], r["pair_index"], r["target_len"]): r for r in pq.read_table(exp / "data.parquet").to_pylist()}
    trained = []
    for rel in tables:
        if not rel.startswith("trl/"):
            # the triplets and the LLaMA-Factory files have no chosen/rejected columns: TRL refuses them
            with pytest.raises(KeyError, match="chosen"):
                _dpo(tiny_model_dir, tokenizer, exp / rel, tmp_path)
            continue
        view = rel.removeprefix("trl/").removesuffix(".parquet")
        kind = view.split("-")[0]
        want = stats[view]
        assert f"| {want['max_prompt']} | {want['max_total']} | {want['max_length']} |" in card
        tr = _dpo(tiny_model_dir, tokenizer, exp / rel, tmp_path, max_length=want["max_length"])
        ds = tr.train_dataset
        assert ds.num_rows == want["rows"] == pq.read_metadata(exp / rel).num_rows  # nothing dropped
        totals = [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)
        ]
        assert max(totals) == want["max_total"] and max(len(p) for p in ds["prompt_ids"]) == want["max_prompt"]
        for ex in ds:
            tl = ex.get("target_len") or min(k[2] for k in triplets if k[:2] == (ex["id"], ex["pair_index"]))
            row = triplets[(ex["id"], ex["pair_index"], tl)]
            prompt = row["short_prompt"] if kind == "short" else row["long_prompt"]
            w, lo = (
                ("long_chosen_response", "long_rejected_response")
                if kind == "longpo"
                else ("chosen_response", "rejected_response")
            )
            ours_w, ours_l = encode(tokenizer, prompt, row[w]), encode(tokenizer, prompt, row[lo])
            assert ex["prompt_ids"] == ours_w.prompt and len(ex["prompt_ids"]) > 0
            assert ex["chosen_ids"] == ours_w.completion and ex["rejected_ids"] == ours_l.completion
        out = tr.train()
        assert math.isfinite(out.training_loss)
        trained.append(view)
    assert sorted(trained) == sorted(stats)


def test_trl_orpo_keeps_every_answer_at_the_card_length(both_export, tiny_model_dir, tokenizer, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    stats = read_json(both_export / "manifest.json")["stats"]["views"]
    for view in ("short", "long-8k", "longpo-8k"):
        ds = load_dataset("parquet", data_files=str(both_export / "trl" / f"{view}.parquet"), split="train")
        args = ORPOConfig(
            output_dir=str(tmp_path / "orpo"),
            report_to="none",
            use_cpu=True,
            max_steps=1,
            per_device_train_batch_size=2,
            max_length=stats[view]["max_length"],
            save_strategy="no",
            bf16=False,
            seed=0,
        )
        tr = ORPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=args,
            train_dataset=ds,
            processing_class=tokenizer,
        )
        for ex in tr.train_dataset:  # not cut: each answer still ends with EOS
            assert ex["chosen_input_ids"][-1] == tokenizer.eos_token_id
            assert ex["rejected_input_ids"][-1] == tokenizer.eos_token_id
        assert tr.train().training_loss > 0


def test_card_trl_example_runs_as_written(both_export, tiny_model_dir, tmp_path, monkeypatch):
    """The card's "Train with TRL" code runs as printed (TRL 1.16: ORPO from trl.experimental.orpo), with only the
    model id and the data folder pointed at this test's tiny model and export; DPO and ORPO each train one epoch."""
    import re
    import shutil

    import trl
    from huggingface_hub import DatasetCard

    card = (both_export / "README.md").read_text()
    section = card.split("## Train with TRL", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "from trl.experimental.orpo import ORPOConfig, ORPOTrainer" in code and not hasattr(trl, "ORPOTrainer")
    assert 'model_id = "tiny' in code  # a local checkpoint is named by its directory name, never a machine path
    code = re.sub(r'^model_id = ".*?"', f"model_id = {str(tiny_model_dir)!r}", code, count=1, flags=re.M)
    # A copy of the export whose example file keeps 2 rows: the code runs unchanged, each trainer does 2 steps.
    data = tmp_path / "export"
    shutil.copytree(both_export, data)
    config = re.search(r'^train = load_dataset\(data_dir, "(\w+)"', code, re.M).group(1)
    meta = DatasetCard.load(data / "README.md").data.configs
    (path,) = [c["data_files"][0]["path"] for c in meta if c["config_name"] == config]
    pq.write_table(pq.read_table(data / path).slice(0, 2), data / path)
    code = re.sub(r'^data_dir = ".*?"', f"data_dir = {str(data)!r}", code, count=1, flags=re.M)
    monkeypatch.chdir(tmp_path)  # the example's output_dirs
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(code, "card-trl-example", "exec"), scope)  # noqa: S102 (the card's own code is what is tested)
    assert (tmp_path / "dpo-out").is_dir() and (tmp_path / "orpo-out").is_dir()
    assert scope["train"].num_rows == 2 and {"prompt", "chosen", "rejected"} <= set(scope["train"].column_names)


def test_every_config_loads_with_datasets(both_export, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(both_export / "README.md")
    names = [c["config_name"] for c in card.data.configs]
    assert names[:4] == ["triplets", "trl_short", "trl_long_4k", "trl_longpo_4k"]
    assert {"trl_long_8k", "trl_longpo_8k", "llamafactory_short", "llamafactory_long_8k"} <= set(names)
    for name in names:
        ds = load_dataset(str(both_export), name, split="train", cache_dir=str(tmp_path / "cache"))
        path = next(c["data_files"][0]["path"] for c in card.data.configs if c["config_name"] == name)
        assert ds.num_rows == pq.read_metadata(both_export / path).num_rows > 0
    default = load_dataset(str(both_export), split="train", cache_dir=str(tmp_path / "cache"))
    assert default.column_names == ["id", "pair_index", "prompt", "chosen", "rejected"]  # trl_short


def test_card_metadata_follows_the_hf_spec(both_export):
    """huggingface_hub parses the card; datasets parses its configs; the values are from the spec's vocabularies."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    card = DatasetCard.load(both_export / "README.md")
    assert isinstance(card.data, DatasetCardData)
    meta = card.data.to_dict()
    # MuSiQue CC BY 4.0 + HotpotQA CC BY-SA 4.0: the derived set is share-alike
    assert meta["license"] == "cc-by-sa-4.0" and "license_name" not in meta
    assert meta["source_datasets"] == ["hotpotqa/hotpot_qa", "dgslibisey/MuSiQue"]
    assert set(meta["task_categories"]) <= {"text-generation", "question-answering"}
    assert meta["size_categories"] == ["n<1K"] and meta["language"] == ["en"]
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert [k for k, v in configs.items() if v.get("default")] == ["trl_short"]
    for name, c in configs.items():
        assert set(c) <= {"data_files", "default"}, name
        for f in c["data_files"]:
            assert f["split"] == "train" and (both_export / f["path"]).is_file()
    flat = json.dumps(meta)
    assert "auto" not in flat.replace("auto-", "") and "other" not in meta["license"]
    assert "CC BY-SA 4.0" in card.text and "yang2018hotpotqa" in card.text and "trivedi2022musique" in card.text


def test_llamafactory_dataset_info_schema(both_export):
    """dataset_info.json checked field by field against LLaMA-Factory's documented schema (data/README.md), and its
    alpaca-ranking conversion (prompt = instruction [+ "\\n" + input]) gives the documented prompt and responses."""
    lf_dir = both_export / "llamafactory"
    info = json.loads((lf_dir / "dataset_info.json").read_text())
    entry_keys = {
        "hf_hub_url",
        "ms_hub_url",
        "script_url",
        "file_name",
        "formatting",
        "ranking",
        "subset",
        "split",
        "folder",
        "num_samples",
        "columns",
        "tags",
    }
    column_keys = {
        "prompt",
        "query",
        "response",
        "history",
        "messages",
        "system",
        "tools",
        "images",
        "videos",
        "audios",
        "chosen",
        "rejected",
        "kto_tag",
    }
    triplets = {
        (r["id"], r["pair_index"], r["target_len"]): r for r in pq.read_table(both_export / "data.parquet").to_pylist()
    }
    assert len(info) == 5
    for name, e in info.items():
        assert set(e) <= entry_keys and {"file_name", "formatting", "ranking", "columns"} <= set(e), name
        assert e["formatting"] == "alpaca" and e["ranking"] is True
        assert set(e["columns"]) <= column_keys and {"prompt", "chosen", "rejected"} <= set(e["columns"])
        t = pq.read_table(lf_dir / e["file_name"])  # file_name is relative to dataset_dir = <export>/llamafactory
        assert set(e["columns"].values()) <= set(t.column_names)
        kind = name.removeprefix("solopo_").split("_")[0]
        col = e["columns"]
        for r in t.to_pylist():
            prompt = r[col["prompt"]] + ("\n" + r[col["query"]] if r[col["query"]] else "")
            key = (
                r["id"],
                r["pair_index"],
                r.get("target_len") or min(k[2] for k in triplets if k[:2] == (r["id"], r["pair_index"])),
            )
            row = triplets[key]
            assert prompt == (row["short_prompt"] if kind == "short" else row["long_prompt"])
            w = "long_chosen_response" if kind == "longpo" else "chosen_response"
            assert r[col["chosen"]] == row[w]
    card = (both_export / "README.md").read_text()
    assert "dataset_dir: path/to/export/llamafactory" in card


def test_no_machine_path_in_exported_files(both_export, tiny_model_dir):
    """The card, its config block, the notes, dataset_info and every string cell of every Parquet file hold no
    absolute path (the model dir, the data file, the run dir, home); the run's own manifest keeps them."""
    forbidden = [str(both_export.parent.parent), str(tiny_model_dir), str(Path.home()), "/tmp/"]
    texts = {
        p: p.read_text() for p in both_export.rglob("*") if p.suffix in (".md", ".json") and p.name != "manifest.json"
    }
    for p in both_export.rglob("*.parquet"):
        texts[p] = json.dumps(pq.read_table(p).to_pylist(), default=str)
    assert len(texts) >= 10
    for p, text in texts.items():
        for bad in forbidden:
            assert bad not in text, f"{p.relative_to(both_export)} holds {bad}"
    card = (both_export / "README.md").read_text()
    assert f"the local checkpoint `{tiny_model_dir.name}`" in card
    assert "kept the first 6 records of musique_ans_train_sample.jsonl" in card
    assert str(tiny_model_dir) in (both_export / "manifest.json").read_text()  # the run's manifest keeps the path


def test_public_model_name_and_license_rules(tmp_path):
    from solopo.stages.export_card import EMBEDDED_PUBLIC, card_license, public_model_name, scrub_paths

    assert public_model_name(None) == EMBEDDED_PUBLIC
    assert public_model_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    (tmp_path / "ckpt").mkdir()
    assert public_model_name(str(tmp_path / "ckpt")) == "ckpt"
    assert card_license(["musique"])[0] == "cc-by-4.0"
    assert card_license(["hotpotqa", "musique"])[0] == "cc-by-sa-4.0"
    assert card_license(["mydata"])[0] == "unknown" and card_license([])[0] == "unknown"
    assert scrub_paths("of /a/b/c.jsonl, https://x.org/a/b and ~/m/n") == "of c.jsonl, https://x.org/a/b and n"
    assert scrub_paths({"k": ["/abs/model-dir", "a/b", 3]}) == {"k": ["model-dir", "a/b", 3]}


REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CARD = REPO / "data_cards" / "example.md"


def test_example_card_is_rendered_from_the_packaged_template(both_export):
    """One source of truth: the packaged template. data_cards/example.md is a card rendered from it (this test's
    export; regenerate with SOLOPO_WRITE_EXAMPLE_CARD=1); every fixed line of the template appears in it in order."""
    import os

    from solopo.resources import resource_text

    if os.environ.get("SOLOPO_WRITE_EXAMPLE_CARD") == "1":
        EXAMPLE_CARD.write_text((both_export / "README.md").read_text())
    assert not (REPO / "data_cards" / "solopo_triplets.md").exists()  # no second copy of the template
    example = EXAMPLE_CARD.read_text().splitlines()
    fixed = [ln for ln in resource_text("templates", "data_card.md").splitlines() if ln.strip() and "$" not in ln]
    at = 0
    for line in fixed:
        assert line in example[at:], (
            f"data_cards/example.md is stale (template line {line!r}); regenerate: SOLOPO_WRITE_EXAMPLE_CARD=1 "
            "python3 -m pytest tests/test_export.py -k example_card"
        )
        at = example.index(line, at) + 1
