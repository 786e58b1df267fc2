"""solopo as a user gets it from a wheel: build the sdist and, from it, the wheel; check what each archive holds;
install the wheel into a fresh virtual env (--system-site-packages: torch & co. are not downloaded again) and run
the commands from a temporary directory outside the checkout. Every Python process of that env carries an audit
hook (a .pth file) that refuses any file read under a solopo checkout, so a command that still needs the checkout
fails here.

The `pair` command runs through a wrapper that swaps the sampling backend for a scripted one (correct for even
samples, wrong for odd ones) so that pairs exist with a random tiny model; everything else is the console script.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import solopo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# What the wheel holds besides solopo/**/*.py: the files commands read at run time (through solopo.resources).
WHEEL_DATA = {
    "solopo/data/README.md",
    "solopo/data/hotpotqa_dev_distractor_official_migres200.json",
    "solopo/data/musique_ans_dev_sample.jsonl",
    "solopo/data/musique_ans_train_sample.jsonl",
    "solopo/templates/data_card.md",
    "solopo/training/ds_configs/offload_full.json",
    "solopo/training/ds_configs/offload_optimizer.json",
    "solopo/training/ds_configs/zero2.json",
    "solopo/training/ds_configs/zero3.json",
}
DIST_INFO = {"METADATA", "WHEEL", "entry_points.txt", "top_level.txt", "RECORD", "licenses/LICENSE"}
# The sdist: the package, README, LICENSE, pyproject, MANIFEST.in, the test suite and the example card; nothing else.
SDIST_TOP = {
    "PKG-INFO",
    "README.md",
    "LICENSE",
    "pyproject.toml",
    "setup.cfg",
    "MANIFEST.in",
    "solopo",
    "solopo.egg-info",
    "tests",
    "data_cards",
    "recipes",
}

GUARD = """
import os, sys
_ROOTS = tuple(r for r in os.environ.get("SOLOPO_FORBID", "").split(os.pathsep) if r)
_LOG = os.environ.get("SOLOPO_GUARD_LOG")


def _hook(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args or not _ROOTS:
        return
    path = args[0]
    if isinstance(path, int) or path is None:
        return
    try:
        path = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return
    if path.startswith(_ROOTS):
        if _LOG:
            with open(_LOG, "a") as f:  # the log lives outside the roots: no recursion
                f.write(f"{event} {path}\\n")
        raise PermissionError(f"solopo read {path} from a checkout")


sys.addaudithook(_hook)
"""

SCRIPTED_PAIR = '''
"""`solopo pair` with a scripted backend: the correct answer (from the load stage) for even samples."""
import re
import sys

import pyarrow.parquet as pq

import solopo.backends as backends
from solopo.backends import Generation

run_dir = sys.argv[sys.argv.index("--run-dir") + 1]
gold = {r["question"]: r["answer"] for r in pq.read_table(f"{run_dir}/load/data.parquet").to_pylist()}


class Scripted:
    name = "scripted"
    max_context = None

    def prompt_lengths(self, prompts):
        return [len(p.split()) for p in prompts]

    def generate(self, prompts, n, temperature, top_p, max_tokens, seed, progress=None):
        out = []
        for p in prompts:
            q = re.findall(r"Question: (.+?)(?:<\\|im_end\\|>|\\n|$)", p)[-1].strip()
            answer = gold[q]
            out.append([Generation(f"Document 1 helps.\\nThe answer is: {answer if j % 2 == 0 else 'Atlantis'}",
                                   "stop", 8) for j in range(n)])
        if progress:
            progress(len(prompts), 0)
        return out

    def close(self):
        pass


backends.get_backend = lambda *a, **k: Scripted()
from solopo.cli import main  # noqa: E402

sys.argv = ["solopo", *sys.argv[1:]]
main()
'''


def _checkouts() -> list[str]:
    """This checkout and any other solopo checkout an editable install points at."""
    roots = {REPO}
    for finder in Path(sysconfig.get_paths()["purelib"]).glob("__editable___solopo*_finder.py"):
        m = re.search(r"^MAPPING\s*(?::[^=]*)?=\s*(\{.*?\})", finder.read_text(), re.S | re.M)
        if m:
            roots |= {Path(v).parent for v in ast.literal_eval(m.group(1)).values()}
    return sorted(str(r) + os.sep for r in roots)


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} -> rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout


def _copy_tree(dst: Path) -> None:
    """The files git would ship (tracked + untracked, not ignored): the build sees what a clone has."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the build copies the files git would ship)")
    base = tmp_path_factory.mktemp("build")
    src, out = base / "src", base / "dist"
    _copy_tree(src)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # --no-isolation: the installed setuptools builds it (no download); sdist first, then the wheel from the sdist.
    _sh([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=base, env=env)
    (wheel,) = out.glob("solopo-*.whl")
    (sdist,) = out.glob("solopo-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_archives_hold_exactly_what_they_should(dists):
    version = solopo.__version__
    assert dists["wheel"].name == f"solopo-{version}-py3-none-any.whl"  # the version comes from solopo/__init__.py
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    py = {n for n in names if n.startswith("solopo/") and n.endswith(".py")}
    want_py = {p.relative_to(REPO).as_posix() for p in (REPO / "solopo").rglob("*.py")}
    assert py == want_py
    assert {n for n in names if n.startswith("solopo/") and not n.endswith(".py")} == WHEEL_DATA
    assert {n.split("/", 1)[1] for n in names if n.startswith(f"solopo-{version}.dist-info/")} == DIST_INFO
    assert names == py | WHEEL_DATA | {f"solopo-{version}.dist-info/{n}" for n in DIST_INFO}
    meta = zipfile.ZipFile(dists["wheel"]).read(f"solopo-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}" in meta and "License-Expression: Apache-2.0" in meta
    assert "License-File: LICENSE" in meta
    # The full Apache 2.0 text, byte for byte the repository's LICENSE, in the wheel and in the sdist.
    license_text = (REPO / "LICENSE").read_bytes()
    assert b"Apache License" in license_text and b"END OF TERMS AND CONDITIONS" in license_text
    assert zipfile.ZipFile(dists["wheel"]).read(f"solopo-{version}.dist-info/licenses/LICENSE") == license_text
    assert (
        "solopo = solopo.cli:main"
        in zipfile.ZipFile(dists["wheel"]).read(f"solopo-{version}.dist-info/entry_points.txt").decode()
    )

    with tarfile.open(dists["sdist"]) as tar:
        members = [m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()]
    assert {m.split("/", 1)[0] for m in members} == SDIST_TOP
    assert {m for m in members if m.startswith("solopo/") and not m.endswith(".py")} == WHEEL_DATA
    assert {m for m in members if m.startswith("tests/")} >= {"tests/conftest.py", "tests/test_wheel.py"}
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]
    assert "data_cards/example.md" in members
    assert "LICENSE" in members
    assert {m for m in members if m.startswith("recipes/")} == {
        p.relative_to(REPO).as_posix() for p in (REPO / "recipes").glob("*.yaml")
    }
    with tarfile.open(dists["sdist"]) as tar:
        (lic,) = [m for m in tar.getmembers() if m.name.split("/", 1)[-1] == "LICENSE"]
        assert tar.extractfile(lic).read() == license_text


def test_commands_run_from_the_installed_wheel(dists, tmp_path):
    work = tmp_path / "outside"  # the commands' working directory: no checkout around
    work.mkdir()
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    _sh([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=work, env=env)
    py, exe = venv / "bin" / "python", venv / "bin" / "solopo"
    # --no-deps: the dependencies come from the system site-packages (checked below); --no-index: nothing downloaded
    _sh(
        [str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--ignore-installed", str(dists["wheel"])],
        cwd=work,
        env=env,
    )
    site = Path(_sh([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work, env).strip())
    (site / "_solopo_checkout_guard.py").write_text(GUARD)
    (site / "zz_solopo_checkout_guard.pth").write_text("import _solopo_checkout_guard\n")
    guard_log = tmp_path / "guard.log"
    env.update(SOLOPO_FORBID=os.pathsep.join(_checkouts()), SOLOPO_GUARD_LOG=str(guard_log))

    # the installed package, and its declared dependencies satisfied by what the env sees
    where = _sh([str(py), "-c", "import solopo; print(solopo.__file__)"], work, env).strip()
    assert where.startswith(str(site)), where
    check = (
        "import importlib.metadata as m; from packaging.requirements import Requirement; bad = ["
        "r for r in map(Requirement, m.requires('solopo')) if not r.marker and "
        "not r.specifier.contains(m.version(r.name), prereleases=True)]; print(bad); assert not bad"
    )
    _sh([str(py), "-c", check], work, env)
    # the guard works: reading a checkout file from this env fails
    probe = subprocess.run(
        [str(py), "-c", f"open({str(REPO / 'pyproject.toml')!r}).read()"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "from a checkout" in probe.stderr
    guard_log.unlink()

    assert _sh([str(exe), "--version"], work, env).strip() == f"solopo {solopo.__version__}"
    assert "--lengths" in _sh([str(exe), "eval", "--help"], work, env)
    shown = _sh([str(exe), "config", "show", "--preset", "cpu-demo"], work, env)
    assert "run_dir: runs/default" in shown and "max_steps: 3" in shown

    tiny = _sh([str(exe), "model", "tiny", str(tmp_path / "tiny")], work, env).strip().splitlines()[-1]
    # one config for the three commands (each reuses the stages the previous one finished)
    run = ["--run-dir", "runs/w", "--model", tiny, "--log-level", "warning"]
    for kv in (
        "synth.target_len=1k",
        "load.limit=4",
        "sample.n=4",
        "sample.max_tokens=16",
        "train.max_steps=1",
        "train.grad_accum=1",
        "train.gradient_checkpointing=false",
    ):
        run += ["--set", kv]
    _sh([str(exe), "synth", *run], work, env)
    (work / "scripted_pair.py").write_text(SCRIPTED_PAIR)
    _sh([str(py), "scripted_pair.py", "pair", *run], work, env)
    out = _sh([str(exe), "train", *run], work, env)
    assert re.search(r"^sample\s+cached", out, re.M) and re.search(r"^train\s+ran", out, re.M), out

    rd = work / "runs" / "w"
    exp = rd / "export"
    card = (exp / "README.md").read_text()
    assert "${" not in card and "dgslibisey/MuSiQue" in card
    info = json.loads((exp / "llamafactory" / "dataset_info.json").read_text())
    assert set(info) == {"solopo_short", "solopo_long_1k"}
    # the shipped sample was read from the installed package, and no exported file names a machine path
    load_source = json.loads((rd / "load" / "manifest.json").read_text())["stats"]["source"]
    assert load_source.startswith(str(site)), load_source
    for p in [exp / "README.md", exp / "llamafactory" / "dataset_info.json", *exp.rglob("*.parquet")]:
        blob = p.read_bytes()
        for bad in (str(tmp_path), str(site), str(Path.home())):
            assert bad.encode() not in blob, f"{p.name} holds {bad}"
    assert (rd / "train" / "_SUCCESS").exists()
    assert not guard_log.exists(), guard_log.read_text()
