"""The library entry point: the pipeline core with every stage registered.

The core (`solopo.pipeline`) imports no stage; importing `solopo.stages` registers each stage, its config section
and presets with it. Use this module from Python the way the CLI does:

    from solopo.api import build_config, run
    cfg = build_config(overrides={"run": {"run_dir": "runs/x"}, "synth": {"target_len": "8k"}})
    run("synth", cfg)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import solopo.stages  # noqa: F401  (registers every stage with the core)
from solopo.pipeline.config import build_config
from solopo.pipeline.runner import Pipeline, StagePlan, is_done, read_manifest
from solopo.stages import ORDER, STAGES, chain


def run(
    until: str, config: Any, start: str = "load", force: tuple[str, ...] = (), rerun: bool = True
) -> dict[str, dict[str, Any]]:
    """Run the stages from `start` to `until` over `config`; finished stages with unchanged inputs are skipped.
    rerun=False refuses (RerunRefused, before anything runs) to redo a finished sample, train or eval."""
    return Pipeline(chain(until, start=start), config).run(force=force, rerun=rerun)


def standalone_eval(run_dir: str | Path) -> bool:
    """True for a run dir whose eval was made by `solopo eval` alone (no train stage feeds it)."""
    m, _ = read_manifest(Path(run_dir) / "eval")
    up = (m or {}).get("upstream")
    return isinstance(up, dict) and up.get("stage") is None and not is_done(run_dir, "train")


def plan(config: Any, force: tuple[str, ...] = (), strict: bool = True) -> list[StagePlan]:
    """What the next command in config's run dir would do with every stage (load through eval), and why."""
    from solopo.stages.evaluate import CompareEvalStage

    rd = config.run.run_dir
    classes = [CompareEvalStage] if standalone_eval(rd) else chain("eval")
    return Pipeline(classes, config).plan(force=force, strict=strict)


__all__ = ["ORDER", "STAGES", "Pipeline", "StagePlan", "build_config", "chain", "plan", "run", "standalone_eval"]
