"""How `solopo train` runs: in-process (one process) or relaunched on N ranks through `accelerate launch` or the
`deepspeed` launcher, each rank executing `python -m solopo.training.launch SPEC.json`.

One command covers 1 CPU (in-process; ZeRO over gloo with a 1-rank env), 1 GPU (in-process), 8 GPUs
(num_processes=8) and several nodes (hostfile, deepspeed launcher)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from solopo.chat import ChatFormat
from solopo.pipeline.errors import ConfigError, MissingDependencyError, SolopoError
from solopo.pipeline.io import read_json, write_json, write_parquet

log = logging.getLogger("solopo")


@dataclass
class LaunchPlan:
    launcher: str  # none | accelerate | deepspeed
    num_processes: int

    @property
    def in_process(self) -> bool:
        return self.launcher == "none"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def hostfile_world(path: str) -> int:
    """The ranks a DeepSpeed hostfile launches: the sum of its `host slots=N` lines (# comments allowed)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError([f"train.hostfile: {path} does not exist"])
    total = 0
    for i, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        slots = [w.removeprefix("slots=") for w in line.split()[1:] if w.startswith("slots=")]
        if len(line.split()) < 2 or not slots or not slots[0].isdigit() or int(slots[0]) < 1:
            raise ConfigError([f"{path}:{i}: expected `hostname slots=N` (DeepSpeed's hostfile format), got {line!r}"])
        total += int(slots[0])
    if total == 0:
        raise ConfigError([f"train.hostfile: {path} names no hosts (`hostname slots=N` per line)"])
    return total


def launch_plan(cfg) -> LaunchPlan:
    """auto: one process in-process; more processes (all visible GPUs) or a hostfile -> a launcher
    (deepspeed's when DeepSpeed is on or a hostfile is given, else accelerate)."""
    n = cfg.num_processes or max(1, _visible_gpus())
    if cfg.launcher == "none":
        if n > 1 or cfg.hostfile:
            raise ConfigError([f"train.launcher=none runs one process; num_processes={n}/hostfile need a launcher"])
        return LaunchPlan("none", 1)
    if cfg.launcher == "auto":
        if n == 1 and not cfg.hostfile:
            return LaunchPlan("none", 1)
        # deepspeed=auto means ZeRO-3 with several GPU ranks (plain data parallel on CPU)
        ds = cfg.deepspeed in ("zero2", "zero3") or (
            cfg.deepspeed == "auto" and (_visible_gpus() > 0 or cfg.sp_planned > 1)
        )
        return LaunchPlan("deepspeed" if (cfg.hostfile or ds) else "accelerate", n)
    if cfg.hostfile and cfg.launcher == "accelerate":
        raise ConfigError(
            ["train.hostfile needs train.launcher=deepspeed (accelerate reads nodes from its own config)"]
        )
    return LaunchPlan(cfg.launcher, n)


def launch_command(plan: LaunchPlan, spec_path: Path, cfg) -> list[str]:
    worker = ["-m", "solopo.training.launch", str(spec_path)]
    if plan.launcher == "accelerate":
        if shutil.which("accelerate") is None:
            raise MissingDependencyError("accelerate", "pip install accelerate", "train.launcher=accelerate")
        cmd = [
            "accelerate",
            "launch",
            "--num_processes",
            str(plan.num_processes),
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
        ]
        # `--multi_gpu` is accelerate's torchrun launcher: N ranks, gloo on CPU (the loop picks the backend).
        # `--cpu` would start one process whatever --num_processes says (accelerate's multi-CPU needs mpirun).
        cmd += ["--multi_gpu"] if plan.num_processes > 1 else ["--cpu"] if _visible_gpus() == 0 else []
        # accelerate wants a script: run the module through python -m
        return [*cmd, "--module", *worker[1:]]
    if shutil.which("deepspeed") is None:
        raise MissingDependencyError("deepspeed", "pip install deepspeed", "train.launcher=deepspeed")
    cmd = ["deepspeed"]
    if not cfg.hostfile:  # one node: a free port, so that concurrent runs on one machine do not collide on 29500
        cmd += ["--master_port", str(_free_port())]
    if cfg.hostfile:
        hostfile_world(cfg.hostfile)  # exists and is well-formed (a ConfigError naming the line otherwise)
        cmd += ["--hostfile", cfg.hostfile]
    else:
        # --num_gpus is deepspeed's --num_accelerators: on the CPU accelerator it is the number of CPU ranks
        # (without it the CPU launcher starts one rank per NUMA node, i.e. usually one).
        cmd += ["--num_nodes", "1", "--num_gpus", str(plan.num_processes)]
    return [*cmd, "--module", *worker[1:]]


def run_launched(
    plan: LaunchPlan,
    cfg,
    model_path: str,
    table: pa.Table | None,
    out_dir: Path,
    seed: int,
    source: str,
    trust_remote_code: bool = False,
    chat: ChatFormat | None = None,
) -> dict[str, Any]:
    """Write the data and a spec next to the model, launch the ranks, read rank 0's result. The spec carries the
    chat format as text (template and system message), so ranks on other nodes need no template file."""
    from solopo.training.seq_parallel import check_sp

    # train.sp_size against the heads and ranks here, in the CLI's process: a config error (exit 2), not N failed
    # ranks. With a hostfile the world size is known only to the ranks (they check it again).
    check_sp(cfg, model_path, cfg.sp_size if cfg.hostfile else plan.num_processes)
    work = Path(out_dir) / "launch"
    work.mkdir(parents=True, exist_ok=True)
    data_path = work / "input.parquet"
    write_parquet(table, data_path)
    result_path = work / f"result-{cfg.algo}-{cfg.mode}.json"
    if result_path.exists():
        result_path.unlink()
    spec = {
        "config": cfg.model_dump(mode="json"),
        "model_path": model_path,
        "data_path": str(data_path.resolve()),
        "out_dir": str(Path(out_dir).resolve()),
        "seed": seed,
        "source": source,
        "result_path": str(result_path.resolve()),
        "trust_remote_code": trust_remote_code,
        "chat": (chat or ChatFormat()).to_spec(),
    }
    spec_path = work / "spec.json"
    write_json(spec, spec_path)
    cmd = launch_command(plan, spec_path.resolve(), cfg)
    env = dict(os.environ)
    if plan.launcher == "deepspeed" and not _visible_gpus():
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    log.info("[train] launching %d process(es): %s", plan.num_processes, " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not result_path.exists():
        raise SolopoError(
            f"training ranks failed (exit {proc.returncode}); see the log above. Command: {' '.join(cmd)}"
        )
    result = read_json(result_path)
    result["launcher"] = plan.launcher
    return result


def main(argv: list[str] | None = None) -> None:
    """Rank entry point: python -m solopo.training.launch SPEC.json"""
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the env too, which is what the loop reads).
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if len(argv) != 1:
        raise SystemExit("usage: python -m solopo.training.launch SPEC.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    from solopo.training.config import TrainConfig
    from solopo.training.loop.trainer import train

    spec = json.loads(Path(argv[0]).read_text())
    cfg = TrainConfig.model_validate(spec["config"])
    result = train(
        cfg,
        model_path=spec["model_path"],
        data_path=spec["data_path"],
        out_dir=spec["out_dir"],
        seed=spec["seed"],
        source=spec["source"],
        trust_remote_code=bool(spec.get("trust_remote_code", False)),
        chat=ChatFormat.from_spec(spec.get("chat")),
    )
    if int(os.environ.get("RANK", 0)) == 0:
        write_json(result, spec["result_path"])


if __name__ == "__main__":
    main()
