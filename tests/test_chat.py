"""Issue 26.10: one chat-template / system-prompt override (run.chat_template, run.system_prompt) used by synth's token
counts, sampling, training and eval, recorded in manifests and cards, carried to the training ranks, and in the cache
keys only when set.

The identity check runs the real CLI on the tiny model with a custom template and a system prompt. Sampling and eval
run the real transformers backend (the ids its model.generate receives are recorded; its answers are then replaced
by scripted ones so that select finds pairs, as tests/test_workflow.py scripts them). The oracle for "the right ids"
is transformers' own apply_chat_template over [system, user] with the custom template, not solopo.chat."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from test_train import export_rows
from typer.testing import CliRunner

from solopo.chat import ChatFormat, chat_format
from solopo.cli import app
from solopo.pipeline.errors import ConfigError, SolopoError

# Plain-text role markers (no <|im_start|>): ids rendered with SmolLM2's own ChatML template cannot pass for these.
TEMPLATE = (
    "{%- for m in messages %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '### Assistant:\\n' }}{%- endif %}"
)
SYSTEM = "You are SYSPROBE, a careful reader of documents."
# What Gemma-style templates do with a system message
NO_SYSTEM = (
    "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{%- endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
)


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res.exit_code, res.output


def oracle(tokenizer, user: str) -> list[int]:
    """transformers' own rendering of [system, user] + generation prompt with TEMPLATE."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    out = tokenizer.apply_chat_template(
        msgs, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


# --- the module ------------------------------------------------------------------------------------------------
def test_template_from_file_inline_or_hf_json(tmp_path, tokenizer):
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    j = tmp_path / "chat_template.json"
    j.write_text(json.dumps({"chat_template": TEMPLATE}))
    inline = chat_format(SimpleNamespace(chat_template=TEMPLATE, system_prompt=SYSTEM))
    from_file = chat_format(SimpleNamespace(chat_template=str(f), system_prompt=SYSTEM))
    from_json = chat_format(SimpleNamespace(chat_template=str(j), system_prompt=SYSTEM))
    assert inline.source == "inline" and from_file.source == str(f) and from_json.source == str(j)
    assert inline.template == from_file.template == from_json.template == TEMPLATE
    for chat in (inline, from_file, from_json):
        assert chat.prompt_ids(tokenizer, "Where?") == oracle(tokenizer, "Where?")
    # the prompt + answer: transformers' rendering of the three turns
    full = tokenizer.apply_chat_template(
        inline.messages("Where?", "Lyon."), chat_template=TEMPLATE, tokenize=True, return_dict=True
    )["input_ids"]
    assert inline.full_ids(tokenizer, "Where?", "Lyon.") == list(full)
    text = tokenizer.decode(inline.prompt_ids(tokenizer, "Where?"))
    assert text == f"### System:\n{SYSTEM}<|im_end|>\n### User:\nWhere?<|im_end|>\n### Assistant:\n"


def test_defaults_render_exactly_the_tokenizers_template(tokenizer):
    chat = chat_format(SimpleNamespace(chat_template=None, system_prompt=None))
    assert chat == ChatFormat() and chat.is_default and chat.fingerprint() == {} and chat.describe() == {}
    msgs = [{"role": "user", "content": "Where is Lyon?"}]
    want = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat.prompt_ids(tokenizer, "Where is Lyon?") == list(want["input_ids"])
    assert "named SmolLM" in tokenizer.decode(want["input_ids"])  # the template's own default system line stays
    # a system prompt alone uses the tokenizer's template: SmolLM2's default system line is replaced
    sys_only = ChatFormat(system_prompt=SYSTEM)
    text = tokenizer.decode(sys_only.prompt_ids(tokenizer, "Q"))
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "SmolLM" not in text


def test_bad_templates_are_config_errors_naming_the_setting(tmp_path, tokenizer):
    def problem(chat_template, system_prompt=None) -> str:
        with pytest.raises(ConfigError) as e:
            chat_format(SimpleNamespace(chat_template=chat_template, system_prompt=system_prompt)).check(tokenizer)
        return str(e.value)

    msg = problem(str(tmp_path / "missing.jinja"))
    assert "run.chat_template: no such file" in msg and "missing.jinja" in msg
    assert "run.chat_template" in problem(str(tmp_path)) and "not a file" in problem(str(tmp_path))
    (tmp_path / "bin.jinja").write_bytes(b"\xff\xfe{{ x }}")
    assert "cannot read" in problem(str(tmp_path / "bin.jinja"))
    (tmp_path / "bad.json").write_text('{"template": "x"}')
    assert "chat_template.json" in problem(str(tmp_path / "bad.json"))
    msg = problem("{% for m in messages %}{{ m['content'] }}")  # no endfor
    assert "run.chat_template" in msg and "not valid Jinja" in msg
    msg = problem("{{ messages[3]['content'] }}")  # parses, fails when rendered
    assert "run.chat_template: run.chat_template=inline does not render" in msg
    msg = problem(NO_SYSTEM, SYSTEM)  # the template is fine; the system role is what it rejects
    assert "run.system_prompt" in msg and "rejects a system message" in msg and "System role not supported" in msg
    chat_format(SimpleNamespace(chat_template=NO_SYSTEM, system_prompt=None)).check(tokenizer)  # fine without


def test_no_template_keeps_its_error(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(SolopoError, match="the model's tokenizer has no chat template"):
        ChatFormat().prompt_ids(bare, "Q")
    with pytest.raises(ConfigError, match="run.system_prompt: the model's tokenizer has no chat template"):
        ChatFormat(system_prompt=SYSTEM).check(bare)
    assert ChatFormat(TEMPLATE, "inline").prompt_ids(bare, "Q")  # the override is the template


def test_config_show_explains_both_settings(keep_logging):
    code, out = cli("config", "show", "--explain")
    assert code == 0
    assert "chat template for every prompt" in out and "chat_template: null" in out
    assert "system message placed before every user prompt" in out and "system_prompt: null" in out
    code, out = cli("config", "show", "--set", "run.default_system=x")
    assert code == 2 and "did you mean run.system_prompt?" in out


# --- cache keys ------------------------------------------------------------------------------------------------
def _keys(config) -> tuple[dict[str, str], dict[str, dict]]:
    from solopo.api import Pipeline, chain

    pipe = Pipeline(chain("eval"), config)
    plans = pipe.plan()
    fps = {cls.name: cls(getattr(config, cls.name), pipe._context(cls)).fingerprint() for cls in pipe.stage_classes}
    return {p.name: p.key for p in plans}, fps


def test_defaults_leave_every_fingerprint_and_key_unchanged(tmp_path, tiny_model_dir):
    """A run dir made before these settings existed must not rerun: with both None no stage's fingerprint gains
    anything and every key is the formula it was before (spelled out here), whether config.yaml names the new
    settings (null) or not (an old run's). Setting either one changes the keys of the stages that render prompts."""
    import yaml

    from solopo.api import STAGES, build_config
    from solopo.pipeline.config import config_to_dict
    from solopo.pipeline.io import stable_hash

    rd = tmp_path / "run"
    base = {"run": {"run_dir": str(rd), "model": str(tiny_model_dir)}}
    keys, fps = _keys(build_config(overrides=base))
    assert all("chat" not in fp for fp in fps.values())
    cfg = build_config(overrides=base)
    upstream = None
    for name, key in keys.items():  # the key formula of every existing run dir (runner.Pipeline._key)
        cls = STAGES[name]
        want = stable_hash(
            {
                "stage": name,
                "version": cls.version,
                "config": config_to_dict(getattr(cfg, name)),
                "run": {"model": str(tiny_model_dir), "seed": 0},
                "upstream": upstream,
                "fingerprint": fps[name],
            }
        )
        assert key == want, name
        upstream = key
    # an old run's config.yaml (no chat keys) and one that names them as null: the same keys
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(base))
    assert _keys(build_config(file=old))[0] == keys
    null = tmp_path / "null.yaml"
    null.write_text(yaml.safe_dump({"run": {**base["run"], "chat_template": None, "system_prompt": None}}))
    assert _keys(build_config(file=null))[0] == keys

    # setting one: load's key holds, the stages that render prompts get a "chat" fingerprint and a new key
    for run in ({"system_prompt": SYSTEM}, {"chat_template": TEMPLATE}):
        k2, fp2 = _keys(build_config(overrides={"run": {**base["run"], **run}}))
        assert k2["load"] == keys["load"]
        for name in ("synth", "sample", "export", "train", "eval"):
            assert "chat" in fp2[name] and k2[name] != keys[name], name
        assert "chat" not in fp2["select"] and k2["select"] != keys["select"]  # through its upstream
    # the template's text is the key, not where the file lies: a moved copy keeps every key
    a, b = tmp_path / "a.jinja", tmp_path / "sub" / "b.jinja"
    b.parent.mkdir()
    a.write_text(TEMPLATE)
    b.write_text(TEMPLATE)
    k_a = _keys(build_config(overrides={"run": {**base["run"], "chat_template": str(a)}}))[0]
    assert k_a == _keys(build_config(overrides={"run": {**base["run"], "chat_template": str(b)}}))[0]
    assert k_a == k2  # the inline template of the loop's last round: the same text


# --- the whole pipeline with a custom template and a system prompt ------------------------------------------------
class Recording:
    """The run's real transformers backend; every id sequence its model.generate receives is recorded (`fed`,
    per stage), then the texts are replaced by scripted answers (sample j of a prompt right when j is even)."""

    fed: dict[str, list[list[int]]] = {}

    def __init__(self, real, golds: dict[str, list[str]], stage: str):
        self.real, self.golds = real, golds
        fed = Recording.fed.setdefault(stage, [])
        generate = real.model.generate

        def spy(input_ids, attention_mask, **kw):
            fed.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
            return generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

        real.model.generate = spy

    def __getattr__(self, name):
        return getattr(self.real, name)

    def generate(self, prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        outs = self.real.generate(prompts, n, temperature, top_p, min(max_tokens, 2), seed, progress=progress)
        scripted = []
        for p, gens in zip(prompts, outs, strict=True):
            gold = self.golds[max((q for q in self.golds if q in p), key=len)][0]
            text = [f"Reasoning.\nThe answer is: {gold if j % 2 == 0 else 'xqzzy'}" for j in range(len(gens))]
            scripted.append([replace(g, text=t, finish_reason="stop") for g, t in zip(gens, text, strict=True)])
        return scripted


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir):
    """train --algo orpo, then eval, with run.chat_template (a file) and run.system_prompt; what each site saw."""
    import solopo.backends
    import solopo.stages.contexts
    import solopo.training.loop.trainer as trainer
    from solopo.datasets import load_records

    golds = {}
    for source, split in (("musique-sample", "train"), ("musique-dev-sample", "validation")):
        for r in load_records(source, dataset="musique", split=split, answerable_only=True, on_bad_record="skip"):
            golds[r.question] = list(r.answers)
    tmp = tmp_path_factory.mktemp("chat")
    tpl = tmp / "my-template.jinja"
    tpl.write_text(TEMPLATE)
    rd = tmp / "run"
    seen: dict[str, list] = {"examples": [], "eval_contexts": []}
    real_get, real_build, real_contexts = solopo.backends.get_backend, trainer.build_examples, None
    real_contexts = solopo.stages.contexts.build_contexts
    stage = {"now": "sample"}

    def get_backend(name, path, ctx_note=None, **kw):
        return Recording(real_get("transformers", path, ctx_note=ctx_note, **kw), golds, stage["now"])

    def build_examples(*a, **kw):
        out = real_build(*a, **kw)
        seen["examples"].extend(out[0])
        return out

    def build_contexts(*a, **kw):
        out = real_contexts(*a, **kw)
        seen["eval_contexts"].append(out)
        return out

    Recording.fed = {}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(solopo.backends, "get_backend", get_backend)
        mp.setattr(trainer, "build_examples", build_examples)
        mp.setattr(solopo.stages.contexts, "build_contexts", build_contexts)
        code, out = cli(
            "train", "--algo", "orpo", "--model", tiny_model_dir, "--target-len", "1k", "--run-dir", rd,
            "--set", "load.limit=4", "--set", "sample.n=2", "--set", "train.max_steps=1",
            "--set", "sample.backend=transformers",
            "--chat-template", tpl, "--system-prompt", SYSTEM,  # the flags (= --set run.chat_template=...)
        )  # fmt: skip
        assert code == 0, out
        stage["now"] = "eval"
        code, out = cli(
            "eval", "--run-dir", rd, "--lengths", "1k", "--n-questions", "2", "--datasets", "musique",
            "--backend", "transformers",
        )  # fmt: skip
        assert code == 0, out
    root.handlers[:], root.level = handlers, level
    return SimpleNamespace(rd=rd, template=tpl, fed=Recording.fed, **seen)


def test_same_ids_at_synth_sampling_training_and_eval(chat_run, tokenizer):
    rd = chat_run.rd
    synth = pq.read_table(rd / "synth" / "data.parquet").to_pylist()
    fed = {tuple(x) for x in chat_run.fed["sample"]}
    assert synth and chat_run.examples
    for row in synth:
        want = oracle(tokenizer, row["short_prompt"])
        assert tuple(want) in fed  # sampling fed the model exactly these ids
        assert row["short_tokens"] == len(want)  # synth counted them
    by_id = {r["id"]: r for r in synth}
    for ex in chat_run.examples:  # training
        row = by_id[ex.id.split("#")[0]]
        assert ex.chosen.prompt == ex.rejected.prompt == oracle(tokenizer, row["short_prompt"])
        assert len(ex.chosen.prompt) == row["short_tokens"]
        assert ex.long_w.prompt == oracle(tokenizer, row["long_prompt"])
        assert tokenizer.decode(ex.chosen.completion).endswith("<|im_end|>\n")  # the template's end of turn
    # eval: every prompt its contexts built went to the model as the oracle's ids, counted as eval counted them
    eval_fed = {tuple(x) for x in chat_run.fed["eval"]}
    built = [r for t in chat_run.eval_contexts for r in t.to_pylist()]
    assert built
    for r in built:
        want = oracle(tokenizer, r["long_prompt"])
        assert tuple(want) in eval_fed and r["long_tokens"] == len(want)
    for seq in chat_run.fed["sample"] + chat_run.fed["eval"]:
        text = tokenizer.decode(seq)
        assert text.startswith(f"### System:\n{SYSTEM}<|im_end|>\n### User:\n") and "<|im_start|>" not in text


def test_outputs_record_the_chat_format(chat_run, tokenizer):
    """Manifests, config.yaml, the export's TRL/LLaMA-Factory files, both cards, report.json and the trained
    tokenizer say which template and system prompt made them."""
    import hashlib

    from transformers import AutoTokenizer
    from trl.data_utils import maybe_apply_chat_template

    rd, sha = chat_run.rd, hashlib.sha256(TEMPLATE.encode()).hexdigest()
    want = {"chat_template": str(chat_run.template), "chat_template_sha256": sha, "system_prompt": SYSTEM}
    for stage in ("synth", "sample", "export", "train", "eval"):
        m = json.loads((rd / stage / "manifest.json").read_text())
        assert m["fingerprint"]["chat"] == {"chat_template_sha256": sha, "system_prompt": SYSTEM}, stage
        assert m["run"]["system_prompt"] == SYSTEM and m["run"]["chat_template"] == str(chat_run.template)
    assert f"system_prompt: {SYSTEM}" in (rd / "config.yaml").read_text()

    # the trained model serves with its training template (HF convention: chat_template.jinja)
    model_dir = rd / "train" / "models" / "orpo-solo"
    assert (model_dir / "chat_template.jinja").read_text() == TEMPLATE
    trained_tok = AutoTokenizer.from_pretrained(model_dir)
    assert trained_tok.chat_template == TEMPLATE
    card = (model_dir / "README.md").read_text()
    assert "Prompt format:" in card and "my-template.jinja" in card and json.dumps(SYSTEM) in card

    # TRL's own conversion of the exported conversational rows with that tokenizer: the text solopo trained on
    short = pq.read_table(rd / "export" / "trl" / "short.parquet").to_pylist()
    chat = ChatFormat(TEMPLATE, "x", SYSTEM)
    for row in short:
        assert row["prompt"][0] == {"role": "system", "content": SYSTEM} and row["prompt"][1]["role"] == "user"
        trl = maybe_apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")}, trained_tok)
        user = row["prompt"][1]["content"]
        assert trl["prompt"] == chat.render(tokenizer, user)
        assert trl["prompt"] + trl["chosen"] == chat.render(tokenizer, user, row["chosen"][0]["content"])
    lf = json.loads((rd / "export" / "llamafactory" / "dataset_info.json").read_text())
    entry = next(iter(lf.values()))
    assert entry["columns"]["system"] == "system"
    assert set(pq.read_table(rd / "export" / "llamafactory" / entry["file_name"]).column("system").to_pylist()) == {
        SYSTEM
    }
    data_card = (rd / "export" / "README.md").read_text()
    assert "Prompt format:" in data_card and json.dumps(SYSTEM) in data_card and "chat_template_path" in data_card
    assert (
        "chat_template: my-template.jinja" in data_card and str(chat_run.template) not in data_card
    )  # no machine path
    settings = json.loads((rd / "eval" / "report.json").read_text())["settings"]
    assert settings["chat"] == {**want, "chat_template": "my-template.jinja"}  # no machine path


def test_changing_the_system_prompt_of_a_finished_run_needs_rerun(chat_run, keep_logging):
    rd = chat_run.rd
    before = {p: p.stat().st_mtime_ns for p in rd.rglob("*") if p.is_file() and p.name != ".lock"}
    code, out = cli("pair", "--run-dir", rd, "--set", "run.system_prompt=Answer tersely.")
    assert code == 2, out
    assert "nothing was run" in out and "--rerun" in out and "  - sample (" in out
    assert f'run.system_prompt: "{SYSTEM[:20]}' in out and '-> "Answer tersely."' in out
    code, out = cli("status", "--run-dir", rd, "--set", "run.system_prompt=Answer tersely.")
    assert code == 0 and "synth   stale" in out and "load    done" in out, out
    # editing the template file (same path) is a change too: its hash is in the fingerprints
    original = chat_run.template.read_text()
    chat_run.template.write_text(original.replace("### ", "## "))
    try:
        code, out = cli("status", "--run-dir", rd)
        assert code == 0 and "sample  stale" in out and "its inputs changed (chat)" in out, out
    finally:
        chat_run.template.write_text(original)
    assert before == {p: p.stat().st_mtime_ns for p in rd.rglob("*") if p.is_file() and p.name != ".lock"}


def test_bad_template_path_exits_2_naming_the_setting(tmp_path, tiny_model_dir, keep_logging):
    rd = tmp_path / "run"
    code, out = cli(
        "synth", "--model", tiny_model_dir, "--run-dir", rd, "--set", f"run.chat_template={tmp_path / 'nope.jinja'}"
    )
    assert code == 2 and "run.chat_template: no such file" in out and "nope.jinja" in out, out
    assert not (rd / "load").exists()  # refused before any stage ran
    code, out = cli("synth", "--model", tiny_model_dir, "--run-dir", rd, "--chat-template", NO_SYSTEM,
                    "--system-prompt", "Be brief.")  # fmt: skip
    assert code == 2 and "run.system_prompt" in out and "rejects a system message" in out, out
    assert not (rd / "synth" / "_SUCCESS").exists()  # when synth loaded the tokenizer, before it counted anything


def test_launched_ranks_get_the_chat_format_through_the_spec(tmp_path, tiny_model_dir, monkeypatch):
    """run_launched writes the spec a rank reads (python -m solopo.training.launch SPEC.json); here the launcher
    process is the rank's main() in this process (world size 1), so the spec is written and read for real."""
    import subprocess

    import pyarrow as pa

    import solopo.training.loop.trainer as trainer
    from solopo.training import launch
    from solopo.training.config import TrainConfig

    seen = []
    real_build = trainer.build_examples

    def build_examples(*a, **kw):
        seen.append(a[7] if len(a) > 7 else kw.get("chat"))
        return real_build(*a, **kw)

    def fake_run(cmd, env=None, **_):
        spec = cmd[cmd.index("solopo.training.launch") + 1]
        launch.main([spec])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(trainer, "build_examples", build_examples)
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    chat = ChatFormat(TEMPLATE, "my-template.jinja", SYSTEM)
    cfg = TrainConfig(max_steps=1, micro_batch_size=1, grad_accum=1, gradient_checkpointing=False, algo="orpo")
    plan = launch.LaunchPlan("accelerate", 2)
    result = launch.run_launched(
        plan, cfg, str(tiny_model_dir), pa.Table.from_pylist(export_rows(2)), tmp_path, 0, "x", chat=chat
    )
    spec = json.loads((tmp_path / "launch" / "spec.json").read_text())
    assert spec["chat"] == {"template": TEMPLATE, "source": "my-template.jinja", "system_prompt": SYSTEM}
    assert seen == [chat]
    assert (Path(result["model_path"]) / "chat_template.jinja").read_text() == TEMPLATE


def test_every_command_that_runs_stages_takes_both_flags(keep_logging):
    for command in ("synth", "pair", "train", "run-all", "eval"):
        code, out = cli(command, "--help")
        assert code == 0 and "--chat-template" in out and "--system-prompt" in out, (command, out)
