"""Config resolution: lengths, precedence, unknown keys and all errors at once, file formats."""

from __future__ import annotations

import pytest

from solopo.api import build_config
from solopo.pipeline.config import parse_length, parse_lengths
from solopo.pipeline.errors import ConfigError


@pytest.mark.parametrize(
    "text,tokens",
    [("8k", 8192), ("4K", 4096), ("1.5k", 1536), ("32k", 32768), (4000, 4000), ("128k", 131072), ("1m", 1048576)],
)
def test_parse_length(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("bad", ["", "eight", "-4k", 0, "4kb", True])
def test_parse_length_rejects(bad):
    with pytest.raises(ValueError):
        parse_length(bad)


def test_parse_lengths_sorted_unique():
    assert parse_lengths("16k,4k,8k,4k") == [4096, 8192, 16384]
    assert parse_lengths(["4k", 8192]) == [4096, 8192]


def test_all_errors_reported_at_once_with_known_keys():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["load.nope=1", "bogus.key=2", "train.algo=ppo"])
    msg = str(e.value)
    assert "3 config problem(s)" in msg
    assert "load.nope: unknown key; known keys: source" in msg
    assert "bogus: unknown key; known sections: run, load" in msg
    assert "train.algo" in msg


def test_a_number_or_auto_field_gets_one_line_naming_both():
    """pydantic reports each branch of `int | "auto"` under its own tag; the user wrote one key."""
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["train.sp_size=0", "train.lr=x"])
    assert e.value.problems[-1] == "train.sp_size: should be greater than or equal to 1, or 'auto' (got 0)"
    assert "2 config problem(s)" in str(e.value) and "constrained-int" not in str(e.value)


def test_precedence_defaults_preset_file_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seed: 7\nload:\n  limit: 5\n")
    cfg = build_config(f, ["load.limit=9"], preset="cpu-demo")
    assert cfg.run.seed == 7  # file over default
    assert cfg.load.limit == 9  # override over file over preset
    assert cfg.run.preset == "cpu-demo"
    cfg2 = build_config(f, [], preset="cpu-demo")
    assert cfg2.load.limit == 5  # file over preset


def test_toml_config(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[run]\nrun_dir = "x"\n[load]\nlimit = 3\n')
    cfg = build_config(f)
    assert cfg.run.run_dir == "x" and cfg.load.limit == 3


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        build_config(preset="nope")
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("load: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        build_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(overrides=["nokey"])


def test_config_is_frozen():
    cfg = build_config()
    with pytest.raises(Exception):  # noqa: B017 (pydantic raises ValidationError on frozen assignment)
        cfg.load.limit = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "key,hint",
    [
        ("train.learning_rate", "did you mean train.lr? (learning_rate is the HF/TRL/LLaMA-Factory name)"),
        ("train.num_train_epochs", "did you mean train.epochs?"),
        ("train.per_device_train_batch_size", "did you mean train.micro_batch_size?"),
        ("train.gradient_accumulation_steps", "did you mean train.grad_accum?"),
        ("train.lr_scheduler_type", "did you mean train.lr_scheduler?"),
        ("train.cutoff_len", "did you mean train.max_length?"),
        ("run.learning_rate", "did you mean train.lr?"),  # an HF name in the wrong section still finds its home
        ("eval.max_new_tokens", "did you mean eval.max_tokens?"),  # the section's own key when it has one
        ("sample.max_new_tokens", "did you mean sample.max_tokens?"),
        ("train.push_to_hub", "solopo does not upload; push the trained folder with `hf upload"),
        ("train.lrr", "did you mean train.lr?"),  # a typo: close spelling in the same section
        ("load.limt", "did you mean load.limit?"),
        ("train.temperature", "did you mean sample.temperature?"),  # a right key in the wrong section
        ("training.lr", "did you mean section train?"),
    ],
)
def test_unknown_keys_get_a_did_you_mean_hint(key, hint):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=[f"{key}=1"])
    loc = key if not key.startswith("training.") else "training"  # an unknown section is reported alone
    line = next(x for x in str(e.value).splitlines() if x.strip().startswith(f"- {loc}:"))
    assert f"{loc}: unknown key; {hint}" in line
    assert "known " in line  # the full list of known keys/sections still follows the hint


def test_unknown_key_far_from_everything_gets_no_guess():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["train.zzzqqq=1"])
    assert "train.zzzqqq: unknown key; known keys: algo" in str(e.value)


def test_every_hf_name_points_at_a_real_key():
    from solopo.pipeline.config import HF_NAMES, _section_keys

    keys = _section_keys()
    for name, value in HF_NAMES.items():
        target, _, why = value.partition("|")
        assert target or why, name
        if target:
            section, key = target.split(".")
            assert key in keys[section], f"{name} -> {target}: no such key"


def test_train_cli_flags_set_the_hf_style_settings(monkeypatch):
    from typer.testing import CliRunner

    import solopo.cli as cli

    seen = {}

    def fake_run(until, config, *args, **kwargs):
        seen["train"] = config.train
        return {}

    monkeypatch.setattr(cli, "_run", fake_run)
    args = ["train", "--lr", "2e-6", "--epochs", "1.5", "--batch-size", "2", "--grad-accum", "4"]
    res = CliRunner().invoke(cli.app, [*args, "--run-dir", "unused"])
    assert res.exit_code == 0, res.output
    t = seen["train"]
    assert (t.lr, t.epochs, t.micro_batch_size, t.grad_accum) == (2e-6, 1.5, 2, 4)
    help_text = CliRunner().invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--lr", "--epochs", "--batch-size", "--grad-accum"):
        assert flag in help_text


def test_every_setting_has_a_description():
    from pydantic import BaseModel

    from solopo.pipeline.config import RunSettings, sections

    def undescribed(prefix: str, cls: type[BaseModel]) -> list[str]:
        out = []
        for k, f in cls.model_fields.items():
            if not (f.description or "").strip():
                out.append(f"{prefix}.{k}")
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):  # nested, e.g. train.lora
                out += undescribed(f"{prefix}.{k}", f.annotation)
        return out

    missing = [m for s, cls in {"run": RunSettings, **sections()}.items() for m in undescribed(s, cls)]
    assert missing == []


def test_config_show_explain_prints_descriptions_as_comments_and_stays_loadable(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from solopo.cli import app
    from solopo.pipeline.config import config_to_dict

    res = CliRunner().invoke(app, ["config", "show", "--explain", "--preset", "cpu-demo", "--set", "train.lr=2e-6"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    # the description sits on the comment line right above its key, in its section
    i = lines.index("  lr: 2.0e-06")
    assert lines[i - 1] == "  # peak learning rate (HF learning_rate)"
    k = lines.index("    r: 16")  # a nested section's keys are explained too
    assert lines[k - 1] == "    # adapter rank" and lines[k - 2] == "  lora:"
    j = next(n for n, line in enumerate(lines) if line.startswith("  save_steps: "))
    assert lines[j - 1].startswith("  # checkpoint every N optimizer steps; None = every save_minutes")
    # the printed text is a config file: loading it (or passing it back with -c) gives the same config
    cfg = build_config(preset="cpu-demo", overrides=["train.lr=2e-6"])
    assert yaml.safe_load(res.output) == config_to_dict(cfg)
    f = tmp_path / "explained.yaml"
    f.write_text(res.output)
    assert config_to_dict(build_config(f)) == config_to_dict(cfg)


# --- issue 20.1: a run dir remembers its settings -------------------------------------------------------------
def _saved_run_dir(tmp_path):
    from solopo.pipeline.config import dump_config

    rd = tmp_path / "R"
    rd.mkdir()
    saved = build_config(
        overrides={
            "run": {"run_dir": "/copied/from/elsewhere", "seed": 5},
            "load": {"limit": 4},
            "sample": {"n": 3, "max_tokens": 99},
            "train": {"lr": 1e-5},
        }
    )
    (rd / "config.yaml").write_text(dump_config(saved))
    return rd


def test_run_dir_settings_are_a_layer_under_preset_file_set_and_flags(tmp_path):
    rd = _saved_run_dir(tmp_path)
    f = tmp_path / "f.yaml"
    f.write_text("sample:\n  max_tokens: 66\n")
    over = {"run": {"run_dir": str(rd)}, "train": {"lr": 2e-5}}
    cfg = build_config(f, over, run_dir_layer=True)
    # run dir < file < overrides; run.run_dir is where the run dir is now, not what its file says
    assert cfg.run.run_dir == str(rd) and cfg.run.seed == 5 and cfg.load.limit == 4
    assert cfg.sample.n == 3 and cfg.sample.max_tokens == 66 and cfg.train.lr == 2e-5
    # a preset sits above the run dir: its keys win, the rest stays
    cfg = build_config(None, over, preset="cpu-demo", run_dir_layer=True)
    assert cfg.sample.n == 8 and cfg.load.limit == 32 and cfg.run.seed == 5 and cfg.run.preset == "cpu-demo"
    # the library default (no run_dir_layer) is the old order
    assert build_config(None, over).load.limit != 4


def test_config_show_names_the_layer_of_each_value(tmp_path):
    from typer.testing import CliRunner

    from solopo.cli import app

    rd = _saved_run_dir(tmp_path)
    res = CliRunner().invoke(app, ["config", "show", "--run-dir", str(rd), "--set", "train.lr=3e-5"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert f"# layers, lowest first: defaults < {rd / 'config.yaml'} (the run dir's settings) < --set / options" in out
    assert f"#   load.limit: {rd / 'config.yaml'} (the run dir's settings)" in out
    assert "#   train.lr: --set / options" in out and "lr: 3.0e-05" in out
    assert f"run_dir: {rd}" in out and "/copied/from/elsewhere" not in out


def test_an_unusable_run_dir_config_is_named(tmp_path):
    from typer.testing import CliRunner

    from solopo.cli import app

    rd = tmp_path / "R"
    rd.mkdir()
    (rd / "config.yaml").write_text("load:\n  nope: 1\n")
    res = CliRunner().invoke(app, ["config", "show", "--run-dir", str(rd)])
    assert (
        res.exit_code == 2 and "the run dir's saved settings" in res.output and "load.nope: unknown key" in res.output
    )
    assert "delete it" in res.output
    res = CliRunner().invoke(app, ["status", "--run-dir", str(rd)])  # status never fails: it names the file
    assert res.exit_code == 0 and "the defaults (" in res.output and "load.nope" in res.output, res.output
