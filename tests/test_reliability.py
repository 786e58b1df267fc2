"""Issue 9: a damaged run dir is never trusted, one writer per run dir, and every bad input ends in a
message (rc 2) naming the file/field and the fix, never a traceback, a hang or "Aborted."."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ConfigDict, create_model
from typer.testing import CliRunner

from solopo.cli import app
from solopo.datasets.base import DATA_DIR, load_records
from solopo.pipeline import io as pio
from solopo.pipeline.config import RunSettings, StageConfig, build_config
from solopo.pipeline.errors import RunDirError, SolopoError
from solopo.pipeline.lock import run_dir_lock
from solopo.pipeline.runner import Pipeline, load_manifest, load_output
from solopo.pipeline.stage import Stage
from solopo.stages import chain

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = DATA_DIR / "musique_ans_train_sample.jsonl"


def cli(*args: str):
    res = CliRunner().invoke(app, list(args))
    out = res.output
    assert "Traceback" not in out and "Aborted" not in out, out
    return res.exit_code, out


def sub_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


# --- toy stages: the executor's behaviour without models ---------------------------------------------
class NConfig(StageConfig):
    n: int = 10


class KConfig(StageConfig):
    k: int = 2


RAN: list[str] = []


class Src(Stage):
    name = "src"
    Config = NConfig
    writes = ("x",)

    def run(self, data):
        RAN.append("src")
        return pa.table({"x": list(range(self.config.n))})


class Mul(Stage):
    name = "mul"
    Config = KConfig
    after = "src"
    reads = ("x",)
    writes = ("y",)
    shard_size = 3

    def run(self, data):
        RAN.append("mul")
        return pa.table({"y": [v * self.config.k for v in data["x"].to_pylist()]})

    def finalize(self, table):
        pio.write_text("an artifact\n", self.ctx.out_dir / "notes" / "summary.txt")
        return table


Cfg = create_model(
    "Cfg",
    __config__=ConfigDict(extra="forbid", frozen=True),
    run=(RunSettings, RunSettings()),
    src=(NConfig, NConfig()),
    mul=(KConfig, KConfig()),
)


def toy(tmp_path, **kw):
    return Cfg(run=RunSettings(run_dir=str(tmp_path / "run")), **kw)


def statuses(summary):
    return {k: v["status"] for k, v in summary.items()}


# --- 1. caches that can be fooled --------------------------------------------------------------------
def test_manifest_records_outputs_and_skip_verifies_them(tmp_path, caplog):
    rd = tmp_path / "run"
    assert statuses(Pipeline([Src, Mul], toy(tmp_path)).run()) == {"src": "ran", "mul": "ran"}
    outputs = load_manifest(rd, "mul")["outputs"]
    data = rd / "mul" / "data.parquet"
    assert outputs["data.parquet"]["bytes"] == data.stat().st_size
    assert outputs["data.parquet"]["sha256"] == pio.file_fingerprint(data)["sha256"]
    assert set(outputs) == {"data.parquet", "notes/summary.txt"}  # artifacts too; not shards or the manifest
    assert statuses(Pipeline([Src, Mul], toy(tmp_path)).run()) == {"src": "cached", "mul": "cached"}

    def damage_then_run(how):
        RAN.clear()
        how()
        with caplog.at_level(logging.WARNING, logger="solopo"):
            caplog.clear()
            out = statuses(Pipeline([Src, Mul], toy(tmp_path)).run())
        return out, caplog.text

    # A truncated table: mul reruns with a warning naming the file.
    out, text = damage_then_run(lambda: os.truncate(data, 100))
    assert out == {"src": "cached", "mul": "ran"} and RAN.count("mul") == 4
    assert f"{data} has 100 bytes" in text and "rerunning" in text
    assert load_output(rd, "mul")["y"].to_pylist() == [2 * i for i in range(10)]

    # The same size, one byte changed: caught by the hash.
    def flip():
        b = bytearray(data.read_bytes())
        b[len(b) // 2] ^= 0xFF
        data.write_bytes(b)

    out, text = damage_then_run(flip)
    assert out == {"src": "cached", "mul": "ran"} and "sha256 differs" in text
    # A missing artifact, a missing table, a corrupt manifest.
    out, text = damage_then_run(lambda: (rd / "mul" / "notes" / "summary.txt").unlink())
    assert out["mul"] == "ran" and "summary.txt is missing" in text
    out, text = damage_then_run(lambda: data.unlink())
    assert out["mul"] == "ran" and "data.parquet is missing" in text
    out, text = damage_then_run(lambda: (rd / "mul" / "manifest.json").write_text('{"stage": '))
    assert out["mul"] == "ran" and "manifest.json is unreadable" in text

    def other_key():
        m = json.loads((rd / "mul" / "manifest.json").read_text())
        (rd / "mul" / "manifest.json").write_text(json.dumps({**m, "key": "0" * 64}))

    out, text = damage_then_run(other_key)
    assert out["mul"] == "ran" and "keys differ" in text
    assert statuses(Pipeline([Src, Mul], toy(tmp_path)).run()) == {"src": "cached", "mul": "cached"}


def test_damaged_upstream_reruns_it_and_every_stage_after_it(tmp_path, caplog):
    rd = tmp_path / "run"
    Pipeline([Src, Mul], toy(tmp_path)).run()
    os.truncate(rd / "src" / "data.parquet", 10)
    RAN.clear()
    with caplog.at_level(logging.WARNING, logger="solopo"):
        out = statuses(Pipeline([Src, Mul], toy(tmp_path)).run())
    assert out == {"src": "ran", "mul": "ran"} and RAN.count("src") == 1
    assert "[mul] rerunning: its input 'src' was rebuilt from a damaged output" in caplog.text


def test_export_output_is_verified_before_train_reads_it(tmp_path):
    # `solopo train` runs load..train: a damaged export is rebuilt on skip; a chain that starts at train
    # refuses to read it. Real stage, real manifest layout; the export table here is a stand-in.
    rd = tmp_path / "run"
    d = rd / "export"
    pio.write_parquet(pa.table({"id": ["a"]}), d / "data.parquet")
    pio.write_json(
        {"key": "k", "outputs": {"data.parquet": pio.output_record(d / "data.parquet", full=True)}}, d / "manifest.json"
    )
    pio.write_text("k\n", d / "_SUCCESS")
    assert load_output(rd, "export").num_rows == 1
    (d / "data.parquet").unlink()
    config = build_config(overrides={"run": {"run_dir": str(rd)}})
    with pytest.raises(SolopoError, match=r"output of stage 'export' is damaged: .*data.parquet is missing"):
        Pipeline(chain("train", start="train"), config).run()


@pytest.fixture(scope="module")
def small_ctx_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a 1024-token context (max_position_embeddings), so that 1536 is over it."""
    d = tmp_path_factory.mktemp("small-ctx") / "tiny-1k"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 1024
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def synth_run(small_ctx_model, tmp_path_factory) -> Path:
    """One finished load+synth run dir made through the CLI; tests copy it."""
    rd = tmp_path_factory.mktemp("synth-run") / "run"
    code, out = cli(
        "synth", "--target-len", "1536", "--model", str(small_ctx_model), "--run-dir", str(rd), "--set", "load.limit=8"
    )
    assert code == 0, out
    return rd


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _synth_args(rd: Path, model: Path) -> list[str]:
    return ["synth", "--target-len", "1536", "--model", str(model), "--run-dir", str(rd), "--set", "load.limit=8"]


def test_cli_truncated_synth_output_is_damaged_in_status_and_rebuilt(synth_run, small_ctx_model, tmp_path):
    rd = _copy(synth_run, tmp_path)
    os.truncate(rd / "synth" / "data.parquet", 5000)
    code, out = cli("status", "--run-dir", str(rd))
    assert code == 0
    assert "synth   damaged" in out and "data.parquet has 5000 bytes" in out and "load    done" in out
    code, out = cli(*_synth_args(rd, small_ctx_model))
    assert code == 0, out
    assert "synth    ran" in out and "load     cached" in out
    assert load_output(rd, "synth").num_rows == 8
    code, out = cli("status", "--run-dir", str(rd))
    assert "synth   done" in out


def test_cli_status_survives_a_corrupt_manifest(synth_run, tmp_path):
    rd = _copy(synth_run, tmp_path)
    (rd / "synth" / "manifest.json").write_text('{"stage": "synth", ')
    code, out = cli("status", "--run-dir", str(rd))
    assert code == 0 and "synth   damaged" in out and "manifest.json is unreadable" in out


# --- 2. model fingerprints -------------------------------------------------------------------------
def test_model_fingerprint_changes_when_weights_are_overwritten_in_place(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from solopo.pipeline.stage import StageContext
    from solopo.stages.evaluate import EvalStage
    from solopo.stages.sample import SampleStage
    from solopo.stages.train import TrainStage

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    assert weights.stat().st_size >= 8 << 20  # the "large file" path: not hashed whole

    config = build_config(overrides={"run": {"model": str(model)}, "eval": {"models": [f"mine={model}"]}})

    def keys():
        out = {"dir": pio.dir_fingerprint(model)["sha256"]}
        for cls in (TrainStage, SampleStage, EvalStage):
            ctx = StageContext(stage=cls.name, out_dir=tmp_path, run=config.run, config=config)
            out[cls.name] = json.dumps(cls(getattr(config, cls.name), ctx).fingerprint(), sort_keys=True)
        return out

    before = keys()
    assert keys() == before  # stable when nothing changed
    w = load_file(weights)
    torch.manual_seed(1)
    save_file({k: torch.randn_like(v) for k, v in w.items()}, weights, metadata={"format": "pt"})
    assert {k: v.shape for k, v in load_file(weights).items()} == {k: v.shape for k, v in w.items()}
    after = keys()
    assert all(after[k] != before[k] for k in before), (before, after)


# --- 3. stale stages in status ----------------------------------------------------------------------
def test_status_shows_stale_after_upstream_or_config_change(synth_run, small_ctx_model, tmp_path):
    rd = _copy(synth_run, tmp_path)
    code, out = cli("status", "--run-dir", str(rd))
    assert "load    done" in out and "synth   done" in out and "config.yaml" in out
    # The same config from the command line: still done. A synth setting that differs: stale.
    same = ["-s", f"run.model={small_ctx_model}", "-s", "load.limit=8", "-s", "synth.target_len=1536"]
    code, out = cli("status", "--run-dir", str(rd), *same)
    assert "synth   done" in out, out
    code, out = cli("status", "--run-dir", str(rd), *same, "-s", "synth.tolerance=0.05")
    assert "synth   stale" in out and "the next run redoes it: synth.tolerance: 0.02 -> 0.05" in out
    # load reruns with another limit (only load): synth was built from the old load output.
    cfg = build_config(overrides={"run": {"run_dir": str(rd), "model": str(small_ctx_model)}, "load": {"limit": 6}})
    assert statuses(Pipeline(chain("load"), cfg).run()) == {"load": "ran"}
    code, out = cli("status", "--run-dir", str(rd))
    assert code == 0 and "load    done     rows=6" in out
    assert "synth   stale" in out and "'load' reran since" in out


# --- 4. one writer per run dir ----------------------------------------------------------------------
HOLDER = """
import sys, time
from solopo.pipeline.lock import run_dir_lock
with run_dir_lock(sys.argv[1], command="holder-for-test synth --run-dir X"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_fails_at_once_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    rd = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(rd)], stdout=subprocess.PIPE, env=sub_env(), text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        missing = str(tmp_path / "no-such.jsonl")
        second = subprocess.run(
            [sys.executable, "-m", "solopo.cli", "synth", "--run-dir", str(rd), "--data", missing],
            capture_output=True,
            text=True,
            env=sub_env(),
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert f"run dir {rd} is in use by another solopo run (pid {holder.pid} " in second.stderr
        assert "holder-for-test synth" in second.stderr and "Traceback" not in second.stderr
        assert not (rd / "load").exists()  # it wrote nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert f"pid {holder.pid}" in (rd / ".lock").read_text()  # the stale file is still there...
    third = subprocess.run(
        [sys.executable, "-m", "solopo.cli", "synth", "--run-dir", str(rd), "--data", missing],
        capture_output=True,
        text=True,
        env=sub_env(),
        timeout=120,
    )
    # ...and no obstacle: this run got the lock and failed later, on its missing data file.
    assert third.returncode == 2 and "no such file" in third.stderr and "in use" not in third.stderr


FORKING_HOLDER = """
import os, sys, time
from solopo.pipeline.lock import run_dir_lock
with run_dir_lock(sys.argv[1], command="forking-holder"):
    if os.fork() == 0:  # the child shares the flock, like a worker process of a run
        print(os.getpid(), flush=True)
        time.sleep(120)
        os._exit(0)
    os._exit(0)  # the parent dies first, as if killed
"""


def test_lock_held_by_an_orphaned_child_says_so(tmp_path):
    rd = tmp_path / "run"
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKING_HOLDER, str(rd)], stdout=subprocess.PIPE, text=True, env=sub_env()
    )
    child = int(parent.stdout.readline().strip())
    parent.wait(timeout=60)
    try:
        code, out = cli("synth", "--run-dir", str(rd))
        assert code == 2 and "forking-holder" in out and "that PID is gone" in out and "fuser -v" in out
    finally:
        os.kill(child, 9)


def test_lock_is_reentrant_in_one_process(tmp_path):
    with run_dir_lock(tmp_path / "run", command="outer"):
        Pipeline([Src], toy(tmp_path)).run()  # Pipeline.run takes it again
        assert "outer" in (tmp_path / "run" / ".lock").read_text()


# --- 5. bad data files ------------------------------------------------------------------------------
def _lines(n=6) -> list[bytes]:
    return SAMPLE.read_bytes().splitlines(keepends=True)[:n]


def test_binary_data_file_is_a_message(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(bytes(range(256)) * 8)
    code, out = cli("synth", "--data", str(f), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and f"{f}: looks like a binary file" in out


def test_latin1_line_fails_with_line_number_or_is_counted_under_skip(tmp_path):
    lines = _lines()
    lines[2] = lines[2].replace(b'"question": "', '"question": "Café '.encode("latin-1"), 1)
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b"".join(lines))
    code, out = cli("synth", "--data", str(f), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and f"{f}:3: not UTF-8 text: byte 0xe9" in out and "iconv" in out
    drops: dict[str, list] = {}
    recs = load_records(
        str(f), on_bad_record="skip", drop=lambda r, n=1, example=None: drops.setdefault(r, []).append(example)
    )
    assert len(recs) == 5 and drops == {"bad_record:not_utf8": [f"{f}:3"]}
    # The same through the load stage: counted in the manifest.
    cfg = build_config(
        overrides={"run": {"run_dir": str(tmp_path / "skip")}, "load": {"source": str(f), "on_bad_record": "skip"}}
    )
    Pipeline(chain("load"), cfg).run()
    m = load_manifest(tmp_path / "skip", "load")
    assert m["rows_out"] == 5 and m["drops"] == {"bad_record:not_utf8": 1}


def test_truncated_gzip_is_a_message_not_aborted(tmp_path):
    blob = gzip.compress(b"".join(_lines()))
    f = tmp_path / "musique.jsonl.gz"
    f.write_bytes(blob[: len(blob) // 2])
    for extra in ([], ["--on-bad-record", "skip"]):
        code, out = cli("synth", "--data", str(f), "--run-dir", str(tmp_path / "run"), *extra)
        assert code == 2 and f"{f}: truncated or corrupt gzip file" in out and "gzip -t" in out


# --- 6. config files ----------------------------------------------------------------------------------
def test_scalar_section_and_non_utf8_config_are_messages(tmp_path):
    scalar = tmp_path / "c.yaml"
    scalar.write_text("run: 5\nsynth: 8k\n")
    code, out = cli("config", "show", "-c", str(scalar))
    assert code == 2 and "2 config problem(s)" in out and "run: must be a section" in out and "got 5" in out
    code, out = cli("synth", "-c", str(scalar))
    assert code == 2 and "run: must be a section" in out
    latin = tmp_path / "l.yaml"
    latin.write_bytes("synth:\n  tolerance: 0.01  # café\n".encode("latin-1"))
    code, out = cli("synth", "-c", str(latin))
    assert code == 2 and f"{latin} is not UTF-8 text (byte 0xe9" in out


# --- 7. the run dir itself ----------------------------------------------------------------------------
def test_run_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, out = cli("synth", "--run-dir", str(f))
    assert code == 2 and f"run dir {f} is a file, not a directory" in out
    code, out = cli("synth", "--run-dir", str(f / "sub"))
    assert code == 2 and f"cannot create run dir {f / 'sub'}: {f} is a file" in out


def _read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        return d, lambda: d.chmod(0o755)
    # root ignores permissions: a read-only tmpfs, where we may mount one
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    return d, lambda: subprocess.run(["umount", str(d)], check=True)


def test_read_only_run_dir(tmp_path):
    d, undo = _read_only_dir(tmp_path)
    try:
        code, out = cli("synth", "--run-dir", str(d))
        assert code == 2 and f"run dir {d} is not writable" in out
        code, out = cli("synth", "--run-dir", str(d / "new"))
        assert code == 2 and f"cannot write {d / 'new'}" in out and "writable --run-dir" in out
    finally:
        undo()


def test_full_disk_while_writing_a_shard_then_rerun_completes(tmp_path, monkeypatch):
    rd = tmp_path / "run"
    real = pio.pq.write_table
    calls = {"n": 0}

    def write_table(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # src's table, mul shard 0, then mul shard 1 hits a full disk mid-write
            with open(where, "wb") as f:
                f.write(b"PAR1 half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pio.pq, "write_table", write_table)
    with pytest.raises(RunDirError, match=r"cannot write .*mul/shards/part-00001.parquet: no space left"):
        Pipeline([Src, Mul], toy(tmp_path)).run()
    mul = rd / "mul"
    assert not (mul / "_SUCCESS").exists() and not (mul / "data.parquet").exists()
    assert sorted(p.name for p in (mul / "shards").iterdir()) == ["_KEY", "part-00000.json", "part-00000.parquet"]
    assert not [p for p in rd.rglob("*.tmp")]  # the half-written temp file is gone
    monkeypatch.setattr(pio.pq, "write_table", real)
    RAN.clear()
    assert statuses(Pipeline([Src, Mul], toy(tmp_path)).run()) == {"src": "cached", "mul": "ran"}
    assert RAN == ["mul"] * 3 and load_manifest(rd, "mul")["shards"]["resumed"] == 1
    assert load_output(rd, "mul")["y"].to_pylist() == [2 * i for i in range(10)]


def test_full_disk_is_a_cli_message(tmp_path, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pio.pq, "write_table", full)
    rd = tmp_path / "run"
    code, out = cli("synth", "--run-dir", str(rd), "--set", "load.limit=4")
    assert code == 2 and f"cannot write {rd / 'load' / 'data.parquet'}: no space left on the device" in out
    assert "rerun the same command" in out and not (rd / "load" / "_SUCCESS").exists()


def test_real_full_tmpfs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        cfg = Cfg(run=RunSettings(run_dir=str(d / "run")), src=NConfig(n=200_000))
        with pytest.raises(RunDirError, match="no space left on the device"):
            Pipeline([Src], cfg).run()
        assert not (d / "run" / "src" / "_SUCCESS").exists() and not list(d.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(d)], check=True)


# --- 8. hub ids on an offline machine --------------------------------------------------------------
def test_unknown_hub_id_offline_fails_fast_with_how_to_provide_it(monkeypatch, tmp_path):
    from solopo.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SolopoError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as e:
        resolve_model("nosuch-org/nosuch-model")
    assert "hf download nosuch-org/nosuch-model --local-dir DIR" in str(e.value) and "--model DIR" in str(e.value)


def test_unknown_hub_id_online_but_unreachable_makes_one_short_attempt(tmp_path):
    # Not offline, hub unreachable (a closed local port): one request, then the message (no minute of retries).
    env = sub_env(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    code = "from solopo.models import resolve_model; resolve_model('nosuch-org/nosuch-model')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "the hub is unreachable" in res.stderr and "hf download" in res.stderr


def test_hub_id_in_the_local_cache_is_accepted_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from solopo.models import resolve_model

    repo = tmp_path / "hub" / "models--some-org--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("some-org/some-model") == "some-org/some-model"


# --- 9. CLI options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval", "-m", "mymodel"], "-m 'mymodel': no such directory and not an owner/name hub id"),
        (["eval", "-m", "=/some/dir"], "-m '=/some/dir': empty label"),
        (["eval", "-m", "mine="], "-m 'mine=': empty path"),
        (["eval", "--force", "synth"], "--force synth: not a stage of this command; use one of eval or all"),
        (["synth", "--force", "synht"], "--force synht: not a stage of this command; use one of load, synth or all"),
        (["synth", "--log-level", "loud"], "--log-level 'loud': unknown level; use one of debug, info, warning"),
    ],
)
def test_cli_option_mistakes_are_messages(tmp_path, args, needle):
    code, out = cli(*args, "--run-dir", str(tmp_path / "run"))
    assert code == 2 and needle in out
    assert not (tmp_path / "run").exists()  # rejected before anything ran


# --- 10. target length over the model's context -------------------------------------------------------
def test_synth_notes_target_len_over_the_model_context(synth_run, small_ctx_model):
    notes = load_manifest(synth_run, "synth")["notes"]
    assert any(
        "synth.target_len [1536] exceeds the model's context limit of 1024 tokens" in n and str(small_ctx_model) in n
        for n in notes
    ), notes


# --- 11. files a collaborator can read ---------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_apply_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        pio.write_json({"a": 1}, tmp_path / "m.json")
        pio.write_parquet(pa.table({"x": [1]}), tmp_path / "d.parquet")
        pio.write_text("k\n", tmp_path / "_SUCCESS")
    finally:
        os.umask(old)
    for name in ("m.json", "d.parquet", "_SUCCESS"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_run_outputs_are_group_readable(synth_run):
    expect = 0o666 & ~pio.current_umask()
    for p in [synth_run / "config.yaml", *(synth_run / "synth").iterdir(), *(synth_run / "load").iterdir()]:
        assert p.stat().st_mode & 0o777 == expect, p


def test_a_file_a_later_stage_amends_does_not_make_the_stage_look_damaged(tmp_path, monkeypatch):
    """Eval adds its table to the trained model's card (train/models/*/README.md): train declares that file
    `amendable`, so the amendment neither reruns train nor breaks the no-op rerun; any other file still counts."""
    rd = tmp_path / "run"
    monkeypatch.setattr(Mul, "amendable", ("notes/*.txt",))
    Pipeline([Src, Mul], toy(tmp_path)).run()
    assert set(load_manifest(rd, "mul")["outputs"]) == {"data.parquet"}
    (rd / "mul" / "notes" / "summary.txt").write_text("amended by a later stage\n")
    assert statuses(Pipeline([Src, Mul], toy(tmp_path)).run()) == {"src": "cached", "mul": "cached"}
    from solopo.stages.train import TrainStage

    assert any(Path("models/orpo-solo/README.md").match(g) for g in TrainStage.amendable)


# --- issue 20 item 3, issue 21 items 2, 6, 7, 8: model directories ------------------------------------------
def test_cli_model_tiny_never_deletes_a_foreign_directory(tmp_path):
    """A non-empty dir solopo did not write is refused (kept as it was) unless --overwrite; a file, or a path under
    a file, is a message; no temp dir is left; the dir it wrote is reused, and rebuilt when its settings differ."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious\n")
    code, out = cli("model", "tiny", str(mine))
    assert code == 2 and "exists and is not empty, and is not a tiny model solopo wrote" in out and "--overwrite" in out
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    code, out = cli("model", "tiny", str(tmp_path / "afile"))
    assert code == 2 and "is a file, not a directory" in out
    code, out = cli("model", "tiny", str(tmp_path / "afile" / "sub"))
    assert code == 2 and f"a parent of it, {tmp_path / 'afile'}, is a file" in out
    code, out = cli("model", "tiny", str(mine), "--overwrite")
    assert code == 0, out
    assert not (mine / "notes.txt").exists() and (mine / "solopo_tiny.json").exists()
    weights = (mine / "model.safetensors").stat().st_mtime_ns
    assert cli("model", "tiny", str(mine))[0] == 0 and (mine / "model.safetensors").stat().st_mtime_ns == weights
    assert cli("model", "tiny", str(mine), "--layers", "1")[0] == 0  # its own dir: rebuilt without --overwrite
    assert json.loads((mine / "config.json").read_text())["num_hidden_layers"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_model_files_follow_the_umask(tmp_path, umask, mode):
    """safetensors writes 0600: the model dir gets the umask's mode like every other output (issue 21 item 8)."""
    from solopo.models import save_dir_atomic

    def save(d: Path) -> None:
        import torch
        from safetensors.torch import save_file

        d.mkdir()
        save_file({"w": torch.zeros(2)}, d / "model.safetensors")
        (d / "config.json").write_text("{}")

    old = os.umask(umask)
    try:
        save_dir_atomic(tmp_path / "m", save)
    finally:
        os.umask(old)
    for p in (tmp_path / "m").iterdir():
        assert p.stat().st_mode & 0o777 == mode, p


def test_tiny_model_fits_vllm_cpu_attention(tiny_model_dir):
    """vLLM 0.32's CPU attention runs head sizes 32, 64, ... (not the 16 the tiny model had: EngineDeadError)."""
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["head_dim"] == 32 and cfg["hidden_size"] == cfg["num_attention_heads"] * 32
    assert cfg["num_attention_heads"] == 2 * cfg["num_key_value_heads"]  # still grouped-query attention
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except Exception:  # noqa: BLE001 - no vLLM here: the shape check above still holds
        return
    assert cfg["head_dim"] in CPUAttentionBackend.get_supported_head_sizes()


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for kind in ("noweights", "notokenizer", "truncated"):
        d = root / kind
        shutil.copytree(tiny_model_dir, d)
        out[kind] = d
    (out["noweights"] / "model.safetensors").unlink()
    (out["notokenizer"] / "tokenizer.json").unlink()
    os.truncate(out["truncated"] / "model.safetensors", 1000)
    return out


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("noweights", "no weights (model.safetensors"),
        ("notokenizer", "no tokenizer (tokenizer.json"),
        ("truncated", "model.safetensors is truncated (1000 bytes"),
    ],
)
def test_cli_broken_model_dir_is_a_message_for_every_command(broken_models, tmp_path, kind, needle):
    """Checked once where the model is resolved, before any engine: synth, pair (also under sample.engine=ray),
    train and eval all stop with the same message (before: OSError / ValueError / SafetensorError tracebacks,
    and Ray's ActorDiedError)."""
    m = str(broken_models[kind])
    base = ["--set", "load.limit=2", "--set", "synth.target_len=1k"]
    for i, args in enumerate(
        [
            ["synth", "--model", m, *base],
            ["pair", "--model", m, *base, "--set", "sample.engine=ray"],
            ["train", "--model", m, *base],
            ["eval", "-m", f"x={m}", "--set", "eval.include_base=false"],
        ]
    ):
        code, out = cli(*args, "--run-dir", str(tmp_path / f"r{i}"))
        assert code == 2 and f"{m} is not a usable model directory: {needle}" in out, (args, out)
        assert "ray" not in out.lower() or "engine=ray" in " ".join(args)


@pytest.fixture(scope="module")
def custom_code_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model under a model_type transformers does not know, with its code in the directory (auto_map)."""
    d = tmp_path_factory.mktemp("custom") / "custom-llama"
    shutil.copytree(tiny_model_dir, d)
    (d / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'solopo_custom'\n"
    )
    (d / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(
        model_type="solopo_custom",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_custom_code_model_needs_trust_remote_code_and_then_trains(custom_code_model, tmp_path):
    """Without run.trust_remote_code: a message naming the setting (before: eval's ValueError traceback); with it,
    training loads the model (before: the trainer's from_pretrained calls did not pass it)."""
    code, out = cli("eval", "-m", f"x={custom_code_model}", "--run-dir", str(tmp_path / "e"))
    assert code == 2 and "needs its own Python code" in out and "--set run.trust_remote_code=true" in out
    from test_train import export_rows

    from solopo.training.config import TrainConfig
    from solopo.training.loop.trainer import train

    cfg = TrainConfig(max_steps=1, grad_accum=1, gradient_checkpointing=False)
    table = pa.Table.from_pylist(export_rows(2))
    with pytest.raises(ValueError, match="trust_remote_code"):
        train(cfg, model_path=str(custom_code_model), table=table, out_dir=tmp_path / "t0")
    res = train(cfg, model_path=str(custom_code_model), table=table, out_dir=tmp_path / "t", trust_remote_code=True)
    assert res["steps"] == 1


def test_cached_embedded_model_written_0600_gets_the_umask_mode(tmp_path, monkeypatch):
    """A converted model cached by an older solopo has safetensors' 0600 weights: the next use gives them the
    umask's mode (no reconversion)."""
    from solopo.models import embedded_model_dir, prepare_embedded_model

    monkeypatch.setenv("SOLOPO_CACHE", str(tmp_path))
    d = embedded_model_dir()
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    os.chmod(d / "model.safetensors", 0o600)
    old = os.umask(0o022)
    try:
        assert prepare_embedded_model() == d
    finally:
        os.umask(old)
    assert (d / "model.safetensors").stat().st_mode & 0o777 == 0o644


# --- issue 21 round two: lengths, wrong-typed manifests, resumable training; issue 20: the run dir -------------
@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("synth.target_len=", "synth.target_len: a length is required (e.g. 8k or 4k,8k), got nothing"),
        ("eval.lengths=", "eval.lengths: a length is required"),
        ("synth.target_len=true", "synth.target_len: not a length or list of lengths: True"),
        ("synth.target_len=1.5", "synth.target_len: not a whole number of tokens: 1.5"),
        ("eval.lengths=[1k, 2.5]", "eval.lengths: not a whole number of tokens: 2.5"),
        ("synth.target_len=1.5k", None),  # 1536: a fraction with a unit is fine
    ],
)
def test_null_bool_and_float_lengths_are_config_errors(setting, needle):
    code, out = cli("config", "show", "--set", setting)
    if needle is None:
        assert code == 0 and "- 1536" in out, out
    else:
        assert code == 2 and needle in out, out


def test_an_empty_length_in_a_yaml_file_is_a_config_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("synth:\n  target_len:\n")
    code, out = cli("config", "show", "-c", str(f))
    assert code == 2 and f"in {f}" in out and "synth.target_len: a length is required" in out


def test_empty_run_dir_is_refused_and_the_users_config_yaml_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("mine: 1\n")
    code, out = cli("synth", "--run-dir", "", "--target-len", "1k", "--set", "load.limit=2")
    assert code == 2 and "run.run_dir is empty" in out and "--run-dir" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "mine: 1\n"
    code, out = cli("status", "--run-dir", "  ")
    assert code == 2 and "run.run_dir is empty" in out


def test_status_and_commands_survive_wrong_typed_manifest_fields(synth_run, small_ctx_model, tmp_path):
    rd = _copy(synth_run, tmp_path)
    m = json.loads((rd / "synth" / "manifest.json").read_text())
    m.update(drops="x", upstream="y", timings="z")
    (rd / "synth" / "manifest.json").write_text(json.dumps(m))
    code, out = cli("status", "--run-dir", str(rd))
    assert code == 0 and "synth   damaged" in out and "field 'upstream' is a str, not a dict" in out, out
    # _SUCCESS as a directory is no marker: load is not done (and neither, then, what it fed)
    shutil.rmtree(rd / "load" / "_SUCCESS", ignore_errors=True)
    (rd / "load" / "_SUCCESS").unlink()
    (rd / "load" / "_SUCCESS").mkdir()
    code, out = cli("status", "--run-dir", str(rd))
    assert code == 0 and "  load    -" in out, out
    code, out = cli(*_synth_args(rd, small_ctx_model))
    assert code == 0 and "load     ran" in out and "synth    ran" in out, out
    assert (rd / "load" / "_SUCCESS").is_file()


def test_train_names_a_wrong_typed_select_manifest_instead_of_crashing(tmp_path):
    from solopo.pipeline.stage import StageContext
    from solopo.stages.train import TrainStage

    (tmp_path / "select").mkdir()
    (tmp_path / "select" / "manifest.json").write_text('["not", "an", "object"]')
    cfg = build_config(overrides={"run": {"run_dir": str(tmp_path)}})
    ctx = StageContext("train", tmp_path / "train", cfg.run, cfg, upstream_dirs={"select": tmp_path / "select"})
    with pytest.raises(SolopoError, match=r"select's drops by reason: unknown \(.*does not hold a JSON object\)"):
        TrainStage(cfg.train, ctx).run(pa.table({"id": pa.array([], pa.string())}))


def test_status_shows_a_killed_training_as_partial_resumable_from_its_last_checkpoint(synth_run, tmp_path):
    rd = _copy(synth_run, tmp_path)
    ckpts = rd / "train" / "models" / "orpo-solo.checkpoints"
    for name, meta in (("2", '{"run_key": "k", "step": 2}'), ("4", "{garbage"), ("3", '{"step": "3"}'),
                       ("5.tmp", '{"step": 5}'), ("6.bak", '{"step": 6}')):  # fmt: skip
        (ckpts / f"step-{name}").mkdir(parents=True)
        (ckpts / f"step-{name}" / "solopo.json").write_text(meta)
    code, out = cli("status", "--run-dir", str(rd))
    assert code == 0, out
    assert "  train   partial   resumable from step 2 (train/models/orpo-solo.checkpoints/step-2)" in out, out
