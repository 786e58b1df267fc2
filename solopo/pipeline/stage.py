"""The stage contract (datatrove-style): one small `run(table) -> table` per stage.

A stage declares its name, its config class, the columns it reads from its input and the columns it
writes. It knows nothing about run directories, manifests or resumption: the executor
(`solopo.pipeline.runner.Pipeline`) owns those.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from .config import StageConfig

log = logging.getLogger("solopo")


@dataclass
class StageContext:
    """What a stage may touch besides its input: its artifact dir, the run settings, counters."""

    stage: str
    out_dir: Path  # artifacts beyond the Parquet table (plots, models, caches) go here
    run: Any  # RunSettings
    config: Any  # the full resolved config (read-only), for stages that need upstream settings
    upstream_dirs: dict[str, Path] = field(default_factory=dict)  # stage name -> its output dir
    drops: Counter = field(default_factory=Counter)
    drop_examples: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    stat_how: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, n: int = 1, example: str | None = None) -> None:
        """Count `n` rows dropped for `reason`; keep a few example ids for the manifest."""
        self.drops[reason] += n
        if example is not None:
            ex = self.drop_examples.setdefault(reason, [])
            if len(ex) < 5:
                ex.append(str(example))

    def note(self, message: str) -> None:
        """A fact the user must see (a fallback, a reduced preset): logged now and kept in the manifest."""
        if message not in self.notes:
            log.warning("[%s] %s", self.stage, message)
            self.notes.append(message)

    def stat(self, key: str, value: Any, how: str = "set") -> None:
        """Record a number for the manifest. how: set | sum | max | min (shards are merged the same way)."""
        if how not in ("set", "sum", "max", "min"):
            raise ValueError(f"unknown stat merge {how!r}")
        self.stat_how[key] = how
        if how == "set" or key not in self.stats:
            self.stats[key] = value
        elif how == "sum":
            self.stats[key] += value
        elif how == "max":
            self.stats[key] = max(self.stats[key], value)
        else:
            self.stats[key] = min(self.stats[key], value)


class Stage:
    """Base class. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    reads: ClassVar[tuple[str, ...]] = ()  # columns required in the input table
    writes: ClassVar[tuple[str, ...]] = ()  # columns guaranteed in the output table
    version: ClassVar[str] = "1"  # bump when the output for an unchanged config changes
    shard_size: ClassVar[int | None] = None  # rows per resumable shard; None = one piece
    # Files (globs relative to the stage dir) that a later stage may amend, e.g. a model card that eval adds its
    # table to: not part of this stage's integrity record, so the amendment does not make it look damaged.
    amendable: ClassVar[tuple[str, ...]] = ()
    # Upstream stage whose output is this stage's input; None = a source stage.
    after: ClassVar[str | None] = None
    # Hours of GPU time (sampling, training, eval): a command never redoes a finished one unless asked (--rerun).
    expensive: ClassVar[bool] = False

    def __init__(self, config: StageConfig, ctx: StageContext):
        self.config = config
        self.ctx = ctx

    @classmethod
    def progress(cls, out_dir: Path) -> str | None:
        """What an unfinished run of this stage left in out_dir for the next run to resume, in words; None if
        nothing. Default: the executor's finished shards."""
        shards = out_dir / "shards"
        if shards.is_dir():
            n = len(list(shards.glob("part-*.json")))
            return f"{n} shard(s) finished; rerun the command to resume"
        return None

    def fingerprint(self) -> dict[str, Any]:
        """Extra inputs the output depends on (files, model dirs); part of the stage's cache key."""
        return {}

    def shard_rows(self) -> int | None:
        """Rows per shard for this run (a stage may read it from its config)."""
        return self.shard_size

    def setup(self) -> None:
        """Load heavy things once (models, tokenizers) before the first shard."""

    def teardown(self) -> None:
        """Free what setup loaded."""

    def run(self, data: pa.Table | None) -> pa.Table:
        """Turn the input table (None for a source stage) into the output table."""
        raise NotImplementedError

    def streams_shards(self) -> bool:
        """True when the executor should hand every unfinished shard to `run_shards` at once (a distributed
        engine that keeps its workers busy across shard boundaries) instead of calling `run` per shard."""
        return False

    def run_shards(
        self, parts: list[tuple[int, pa.Table]], scope: Callable[[int], AbstractContextManager[Any]]
    ) -> Iterator[tuple[int, pa.Table]]:
        """Yield (shard index, output) for every part, each as soon as it is done; the executor writes it
        then. Counting (drops, stats) for shard i must happen inside `with scope(i):`."""
        raise NotImplementedError

    def finalize(self, table: pa.Table) -> pa.Table:
        """Called once on the concatenated output of all shards (plots, summaries). Default: no change."""
        return table


# name -> stage class, filled by `solopo.stages` at import (the core itself imports no stage).
STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    STAGES[cls.name] = cls
    return cls
