"""scripts/gpu_check.sh --dry-run on CPU (tiny shape, tiny lengths): the one-command GPU check stays runnable, and
every phase writes its results under one folder ($OUT)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in ("tests", "bench", "search", "search_dense", "throughput"):
        assert f"{phase} rc=0" in summary
    bench = json.loads((out / "results_qwen2-tiny.json").read_text())
    assert {r["mode"] for r in bench["rows"]} == {"solo", "long", "solo-shared", "long-shared"}
    assert all(r["activation_gb"] is not None and r["step_s"] > 0 for r in bench["rows"])
    assert (out / "results_qwen2-tiny.png").stat().st_size > 0
    search = json.loads((out / "results_qwen2-tiny_search.json").read_text())["search"]
    assert search and all(r["fits"] >= 256 for r in search)
    tp = json.loads((out / "throughput.json").read_text())["rows"]
    assert {r["backend"] for r in tp} == {"plain"} and not any("error" in r for r in tp)
    assert all(0 < r["mfu"] < 1 and r["profile_ms"]["backward"] > 0 for r in tp)
