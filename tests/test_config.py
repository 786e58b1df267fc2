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
    assert res.exit_code == 2 and "the run dir's saved settings" in res.output and "load.nope: unknown key" in res.output
    assert "delete it" in res.output
    res = CliRunner().invoke(app, ["status", "--run-dir", str(rd)])  # status never fails: it names the file
    assert res.exit_code == 0 and "the defaults (" in res.output and "load.nope" in res.output, res.output
