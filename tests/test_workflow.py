"""Issue 20: commands that compose. The mission's sequence `solopo synth --target-len 8k`, `solopo pair`,
`solopo train --algo orpo` in one run dir synthesizes, pairs and trains on the same data; nothing finished is
redone unasked; hand-edited documents rerun nothing; copied and moved run dirs stay correct.

The tiny random model never answers right, so sampling (and eval generation) is scripted: a patched
`solopo.backends.get_backend` answers every other sample with the gold answer. Everything else is real: the
CLI in-process, the run dir on disk, synth with the tiny model's tokenizer, training with the transformers loop.
The target length is 2k instead of 8k (tiny sizes); the commands are otherwise typed as in the mission."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from solopo.backends import Generation, render_chat_ids
from solopo.cli import app


@pytest.fixture(scope="module")
def golds() -> dict[str, list[str]]:
    """question -> answers of the shipped MuSiQue train and dev samples (what pair samples and eval asks)."""
    from solopo.datasets import load_records

    out = {}
    for source, split in (("musique-sample", "train"), ("musique-dev-sample", "validation")):
        recs = load_records(source, dataset="musique", split=split, answerable_only=True, on_bad_record="skip")
        out.update({r.question: list(r.answers) for r in recs})
    return out


class Scripted:
    """n samples per prompt, every other one right (so select finds pairs); greedy eval answers right."""

    name = "scripted"
    dtype = "none"
    max_context = None
    calls = 0

    def __init__(self, tokenizer, golds):
        self.tokenizer, self.golds = tokenizer, golds

    def prompt_lengths(self, prompts):
        return [len(render_chat_ids(self.tokenizer, p)) for p in prompts]

    def generate(self, prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        Scripted.calls += 1
        out = []
        for p in prompts:
            gold = self.golds[max((q for q in self.golds if q in p), key=len)][0]
            answers = [gold if j % 2 == 0 else "xqzzy" for j in range(n)]
            out.append([Generation(f"Reasoning.\nThe answer is: {a}", "stop", 9) for a in answers])
        if progress:
            progress(len(prompts), 9 * len(prompts))
        return out

    def close(self):
        pass


@pytest.fixture
def scripted(monkeypatch, tokenizer, golds):
    import solopo.backends

    Scripted.calls = 0
    monkeypatch.setattr(
        solopo.backends, "get_backend", lambda name, path, ctx_note=None, **kw: Scripted(tokenizer, golds)
    )


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output


def statuses(out: str) -> dict[str, str]:
    """{stage: ran|cached} from a command's summary table."""
    rows = [line.split() for line in out.splitlines()]
    return {r[0]: r[1] for r in rows if len(r) > 2 and r[1] in ("ran", "cached")}


def mtimes(rd: Path) -> dict[str, int]:
    return {
        p.relative_to(rd).as_posix(): p.stat().st_mtime_ns for p in rd.rglob("*") if p.is_file() and p.name != ".lock"
    }


def test_mission_sequence_composes_and_nothing_upstream_reruns(tmp_path, tiny_model_dir, scripted, keep_logging):
    rd = tmp_path / "R"
    # 1. synth with the run's settings; later commands name only what they add.
    code, out = cli(
        "synth", "--target-len", "2k", "--model", tiny_model_dir, "--run-dir", rd,
        "--set", "load.limit=4", "--set", "sample.n=4", "--set", "train.max_steps=1",
    )  # fmt: skip
    assert code == 0, out
    assert statuses(out) == {"load": "ran", "synth": "ran"}
    assert pq.read_table(rd / "load" / "data.parquet").num_rows == 4

    # 2. `solopo pair`: load and synth are the ones step 1 made (4 questions at 2k), not the defaults.
    before = mtimes(rd / "synth")
    code, out = cli("pair", "--run-dir", rd)
    assert code == 0, out
    assert statuses(out) == {"load": "cached", "synth": "cached", "sample": "ran", "select": "ran", "export": "ran"}
    assert mtimes(rd / "synth") == before
    assert set(pq.read_table(rd / "export" / "data.parquet").column("target_len").to_pylist()) == {2048}
    # the final summary names what to open next: the export configs with their max_length
    assert "open next:" in out and "max_length" in out and "trl_short" in out

    # 3. `solopo train --algo orpo`: trains on that export at 2k; nothing upstream reruns.
    calls = Scripted.calls
    code, out = cli("train", "--algo", "orpo", "--run-dir", rd)
    assert code == 0, out
    assert statuses(out) == {s: "cached" for s in ("load", "synth", "sample", "select", "export")} | {"train": "ran"}
    assert Scripted.calls == calls  # no sampling
    row = pq.read_table(rd / "train" / "data.parquet").to_pylist()[0]
    assert row["target_len"] == 2048 and row["algo"] == "orpo" and row["steps"] == 1
    assert row["model_path"] == "train/models/orpo-solo"  # stored relative to the run dir (issue 20.4)
    assert f"{rd / 'train/models/orpo-solo'}  trained model (orpo-solo)" in out
    saved = (rd / "config.yaml").read_text()
    assert "limit: 4" in saved and "- 2048" in saved and "algo: orpo" in saved

    # status: everything done, eval not run; the settings come from the run dir's config.yaml
    code, out = cli("status", "--run-dir", rd)
    assert code == 0 and "config.yaml (the run dir's settings)" in out
    for stage in ("load", "synth", "sample", "select", "export", "train"):
        assert f"  {stage:<7} done" in out, out
    assert "  eval    -" in out

    # Hand-edited documents rerun nothing (the data card, the model card): only data files do.
    with open(rd / "export" / "README.md", "a") as f:
        f.write("\nMy note about this dataset.\n")
    with open(rd / "train" / "models" / "orpo-solo" / "README.md", "a") as f:
        f.write("\nMy note about this model.\n")
    code, out = cli("train", "--algo", "orpo", "--run-dir", rd)
    assert code == 0 and set(statuses(out).values()) == {"cached"}, out


def test_finished_expensive_stages_are_not_redone_unasked(tmp_path, tiny_model_dir, scripted, keep_logging):
    rd = tmp_path / "R"
    data = tmp_path / "my_musique.jsonl"
    shutil.copy(Path(__file__).resolve().parents[1] / "solopo/data/musique_ans_train_sample.jsonl", data)
    # The README's GPU recipe, shrunk: pair with --model/--data/--target-len, then train with --model.
    code, out = cli(
        "pair", "--model", tiny_model_dir, "--data", data, "--target-len", "2k", "--run-dir", rd,
        "--set", "load.limit=4", "--set", "sample.n=4", "--set", "train.max_steps=1",
    )  # fmt: skip
    assert code == 0, out
    code, out = cli("train", "--model", tiny_model_dir, "--algo", "orpo", "--run-dir", rd)
    assert code == 0, out
    assert statuses(out)["export"] == "cached" and statuses(out)["train"] == "ran"
    assert pq.read_table(rd / "load" / "data.parquet").num_rows == 4

    # A changed setting that would redo the finished sample: exit 2 before anything runs, naming the keys,
    # the stages with their recorded rows and time, and the flag.
    before = mtimes(rd)
    code, out = cli("pair", "--run-dir", rd, "--set", "sample.temperature=0.7")
    assert code == 2, out
    assert "nothing was run" in out and "sample.temperature: 0.85 -> 0.7" in out and "--rerun" in out
    assert "  - sample (" in out and " rows, " in out
    assert mtimes(rd) == before  # not even config.yaml changed

    # status shows what that command would redo, every downstream stage with its reason
    code, out = cli("status", "--run-dir", rd, "--set", "sample.temperature=0.7")
    assert code == 0
    assert "sample  stale" in out and "sample.temperature: 0.85 -> 0.7" in out
    for stage in ("select", "export", "train"):
        assert f"{stage:<7} stale" in out and "its input" in out, out
    assert "load    done" in out and "synth   done" in out

    # A cheap stage reruns with a warning (load.limit: load, synth; sample is not in synth's chain).
    code, out = cli("synth", "--run-dir", rd, "--set", "load.limit=3")
    assert code == 0 and "[load] rerunning" in out and "load.limit: 4 -> 3" in out, out

    # --rerun accepts it; --force keeps working (no refusal: asked for by name).
    code, out = cli("pair", "--run-dir", rd, "--rerun")
    assert code == 0 and statuses(out)["sample"] == "ran", out
    code, out = cli("train", "--run-dir", rd)
    assert code == 2 and "train (1 rows" in out and "'export' reran since" in out, out
    code, out = cli("train", "--run-dir", rd, "--force", "train")
    assert code == 0 and statuses(out)["train"] == "ran", out


def test_eval_in_a_training_run_then_copied_and_moved_run_dirs(tmp_path, tiny_model_dir, scripted, keep_logging):
    ra = tmp_path / "r-A"
    code, out = cli(
        "train", "--algo", "orpo", "--model", tiny_model_dir, "--target-len", "2k", "--run-dir", ra,
        "--set", "load.limit=4", "--set", "sample.n=4", "--set", "train.max_steps=1",
    )  # fmt: skip
    assert code == 0, out
    ev = ["--lengths", "1k", "--n-questions", "2", "--datasets", "musique", "--backend", "transformers"]
    # `solopo eval --run-dir R` on a training run: evaluates its base and its trained model; config.yaml keeps
    # the run's settings (only eval's change), so status shows nothing stale.
    code, out = cli("eval", "--run-dir", ra, *ev)
    assert code == 0, out
    report = json.loads((ra / "eval" / "report.json").read_text())
    assert report["model_paths"]["orpo-solo"] == "train/models/orpo-solo"
    assert f"{ra / 'eval' / 'report.md'}  the eval report" in out
    code, out = cli("status", "--run-dir", ra)
    assert code == 0 and "stale" not in out and "  eval    done" in out, out
    with open(ra / "eval" / "report.md", "a") as f:  # a hand-edited report reruns nothing
        f.write("\nMy reading of these numbers.\n")
    code, out = cli("eval", "--run-dir", ra, *ev)
    assert code == 0 and statuses(out) == {"eval": "cached"}, out

    # cp -a, then mv the original away: the copy evaluates its own model and writes only its own card.
    rb, rc = tmp_path / "r-B", tmp_path / "r-C"
    shutil.copytree(ra, rb, symlinks=True)
    ra.rename(rc)
    card_c = (rc / "train/models/orpo-solo/README.md").read_bytes()
    code, out = cli("status", "--run-dir", rb)
    assert code == 0 and "stale" not in out and "damaged" not in out, out
    code, out = cli("eval", "--run-dir", rb, *ev[:2], "--n-questions", "3", *ev[4:], "--rerun")
    assert code == 0, out
    assert json.loads((rb / "eval" / "report.json").read_text())["settings"]["n_questions_requested"] == 3
    assert (rc / "train/models/orpo-solo/README.md").read_bytes() == card_c  # the moved original: untouched
    assert "(n=3)" in (rb / "train/models/orpo-solo/README.md").read_text()  # the copy's own card got the table
    # the moved run dir still works: its stages are done, its eval cached
    code, out = cli("eval", "--run-dir", rc, *ev)
    assert code == 0 and statuses(out) == {"eval": "cached"}, out


def test_eval_from_run_takes_every_eval_setting_of_the_run(tmp_path, tiny_model_dir, scripted, keep_logging):
    """Issue 22.4: lengths, n_questions, datasets, match, run.seed, run.model (the base), the chat format (issue
    26.10: a system prompt the run trained with) and what the run's eval
    excludes (its loaded ids and its own eval.exclude_from) come from the run; options given still win."""
    from solopo.api import build_config
    from solopo.datasets import load_records
    from solopo.pipeline.config import dump_config
    from solopo.pipeline.io import write_parquet, write_text

    dev = load_records("musique-dev-sample", dataset="musique", split="validation", answerable_only=True)
    x = tmp_path / "X"
    other = tmp_path / "other-ids.parquet"
    write_parquet(pa.table({"id": [dev[1].id]}), other)
    cfg = build_config(
        overrides={
            "run": {"run_dir": str(x), "model": str(tiny_model_dir), "seed": 3, "system_prompt": "Be brief."},
            "sample": {"max_tokens": 77},
            "eval": {"lengths": ["1k"], "n_questions": 2, "datasets": ["musique"], "match": "substring",
                     "exclude_from": str(other), "models": ["ignored=/nowhere"]},
        }
    )  # fmt: skip
    write_text(dump_config(cfg), x / "config.yaml")
    write_parquet(pa.table({"id": [dev[0].id, "not-a-dev-id"]}), x / "load" / "data.parquet")

    e = tmp_path / "E"
    code, out = cli("eval", "--from-run", x, "-m", f"mine={tiny_model_dir}", "--base", "--n-questions", "3",
                    "--backend", "transformers", "--run-dir", e)  # fmt: skip
    assert code == 0, out
    saved = build_config(e / "config.yaml")
    assert saved.eval.lengths == [1024] and saved.eval.datasets == ["musique"] and saved.eval.match == "substring"
    assert saved.eval.n_questions == 3  # the option given here wins
    assert (
        saved.run.seed == 3
        and saved.run.model == str(tiny_model_dir)
        and saved.eval.models == [f"mine={tiny_model_dir}"]
    )
    report = json.loads((e / "eval" / "report.json").read_text())
    assert report["settings"]["seed"] == 3 and report["settings"]["max_tokens"] == 77
    assert saved.run.system_prompt == "Be brief." and report["settings"]["chat"]["system_prompt"] == "Be brief."
    assert report["models"][0] == "base (tiny-llama)"
    m = json.loads((e / "eval" / "manifest.json").read_text())
    assert m["drops"]["musique:overlaps_training_ids"] == 2
    assert set(m["drop_examples"]["musique:overlaps_training_ids"]) == {dev[0].id, dev[1].id}
