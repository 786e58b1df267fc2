"""The library entry point: the pipeline core with every stage registered.

The core (`solopo.pipeline`) imports no stage; importing `solopo.stages` registers each stage, its config section
and presets with it. Use this module from Python the way the CLI does:

    from solopo.api import build_config, run
    cfg = build_config(overrides={"run": {"run_dir": "runs/x"}, "synth": {"target_len": "8k"}})
    run("synth", cfg)
"""

from __future__ import annotations

from typing import Any

import solopo.stages  # noqa: F401  (registers every stage with the core)
from solopo.pipeline.config import build_config
from solopo.pipeline.runner import Pipeline
from solopo.stages import ORDER, STAGES, chain


def run(until: str, config: Any, start: str = "load", force: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Run the stages from `start` to `until` over `config`; finished stages with unchanged inputs are skipped."""
    return Pipeline(chain(until, start=start), config).run(force=force)


__all__ = ["ORDER", "STAGES", "Pipeline", "build_config", "chain", "run"]
