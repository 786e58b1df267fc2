"""Typed configuration: one frozen pydantic model per stage, composed into the run config.

Order of precedence: defaults < the run dir's config.yaml (commands) < preset < config file (YAML or TOML) <
CLI overrides (--set, then named flags).
Unknown keys are rejected and every problem is reported at once (torchtune-style).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import ConfigError


class StageConfig(BaseModel):
    """Base for every stage's config: frozen, unknown keys rejected, and every float finite (nan/inf in any float
    field, nested ones included, is a config error: train.lr=nan would otherwise train to a NaN model)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


_LEN_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(value: int | str) -> int:
    """'8k' -> 8192, '1.5k' -> 1536, '32K' -> 32768, 4000 -> 4000 (RULER's power-of-two convention)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a length: {value!r} (use e.g. 8k, 16k, 4096)")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"not a whole number of tokens: {value!r} (use e.g. 8k, 1.5k or 4096)")
        value = int(value)
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"length must be positive, got {value}")
        return value
    m = _LEN_RE.match(str(value))
    if not m:
        raise ValueError(f"not a length: {value!r} (use e.g. 8k, 16k, 4096)")
    num, unit = float(m.group(1)), m.group(2).lower()
    if not unit and not num.is_integer():
        raise ValueError(f"not a whole number of tokens: {value!r} (use e.g. 8k, 1.5k or 4096)")
    mult = {"": 1, "k": 1024, "m": 1024 * 1024}[unit]
    out = int(round(num * mult))
    if out <= 0:
        raise ValueError(f"length must be positive, got {value!r}")
    return out


def parse_lengths(value: Any) -> list[int]:
    """'4k,8k' or ['4k', 8192] or 8192 -> sorted unique token lengths. Anything else (an empty `key:` in YAML,
    `--set x=`, true, 1.5) is a ValueError, which pydantic reports as a config problem naming the key."""
    if value is None:
        raise ValueError("a length is required (e.g. 8k or 4k,8k), got nothing")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        items = [v for v in str(value).split(",") if v.strip()] if isinstance(value, str) else [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"not a length or list of lengths: {value!r} (use e.g. 8k or 4k,8k)")
    out = sorted({parse_length(v) for v in items})
    if not out:
        raise ValueError("at least one length is required")
    return out


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


class RunSettings(StageConfig):
    """Settings shared by all stages."""

    run_dir: str = Field(default="runs/default", description="where every stage writes its outputs")
    model: str | None = Field(default=None, description="HF id or local path; None = embedded SmolLM2-135M-Instruct")
    trust_remote_code: bool = Field(default=False, description="run the model repo's own Python code (HF)")
    chat_template: str | None = Field(
        default=None,
        description="chat template for every prompt (synth counts, sampling, training, eval): None = the tokenizer's "
        "own; else a .jinja file (or HF chat_template.json) or an inline Jinja template (like vLLM's --chat-template)",
    )
    system_prompt: str | None = Field(
        default=None,
        description="system message placed before every user prompt (synth counts, sampling, training, eval, the "
        "export's TRL messages); None = no system message (the template's own default, if it has one, applies)",
    )
    seed: int = Field(default=0, description="seed of every stage whose own seed is None")
    preset: str | None = Field(default=None, description="named preset applied under the config file")


# name -> stage config class. The core imports no stage: whoever imports `solopo.stages` (the CLI, `solopo.api`)
# fills this registry, each stage registering its own section.
_SECTIONS: dict[str, type[StageConfig]] = {}


def register_section(name: str, cls: type[StageConfig]) -> None:
    _SECTIONS[name] = cls


def sections() -> dict[str, type[StageConfig]]:
    if not _SECTIONS:
        raise ConfigError(
            ["no stage is registered: import solopo.stages first (or use solopo.api.build_config)"],
            source="solopo.pipeline.config",
        )
    return dict(_SECTIONS)


def config_model() -> type[BaseModel]:
    fields: dict[str, Any] = {"run": (RunSettings, RunSettings())}
    for name, cls in sections().items():
        fields[name] = (cls, Field(default_factory=cls))
    return create_model(
        "SolopoConfig", __config__=ConfigDict(extra="forbid", frozen=True, protected_namespaces=()), **fields
    )


PRESETS: dict[str, dict[str, Any]] = {}


def register_preset(name: str, overrides: dict[str, Any]) -> None:
    """Presets are nested dicts merged under the config file; stages add their part."""
    PRESETS.setdefault(name, {})
    _deep_merge(PRESETS[name], overrides)


def _deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"config file not found: {path}"])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"]
        ) from None
    try:
        if path.suffix in (".toml",):
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([f"cannot parse {path}: {e}"], source=str(path)) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (run, load, synth, ...)"])
    scalars = [
        f"{k}: must be a section of keys (`{k}:` then indented `key: value` lines), got {v!r}"
        for k, v in data.items()
        if not isinstance(v, dict)
    ]
    if scalars:
        raise ConfigError(scalars, source=str(path))
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """'synth.target_len=[4k,8k]' -> (['synth', 'target_len'], ['4k', '8k']); values are YAML scalars."""
    if "=" not in item:
        raise ConfigError([f"override {item!r} must look like section.key=value"])
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError([f"override {item!r}: the key needs a section, e.g. synth.target_len=8k"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_nested(d: dict, parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError([f"override {'.'.join(parts)}: {p} is not a section"])
    d[parts[-1]] = value


# Names a TRL / transformers TrainingArguments / LLaMA-Factory user types, and solopo's key for each. A value of None
# means solopo has no such setting; the text after "|" says what to do instead.
HF_NAMES: dict[str, str] = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_ratio|solopo takes the warmup as a fraction of the steps",
    "max_steps": "train.max_steps",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "report_to": "train.report_to",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "bf16": "train.dtype|set train.dtype=bf16",
    "fp16": "train.dtype|fp16 is not supported; train.dtype is auto, bf16 or fp32",
    "torch_dtype": "train.dtype",
    "attn_implementation": "train.attn",
    "deepspeed": "train.deepspeed|solopo takes zero2 or zero3 (or auto/none), not a JSON path",
    "resume_from_checkpoint": "train.resume",
    "max_length": "train.max_length",
    "cutoff_len": "train.max_length",
    "beta": "train.beta|for ORPO, TRL's beta is train.orpo_lambda",
    "simpo_gamma": "train.gamma",
    "loss_type": "train.algo",
    "pref_loss": "train.algo",
    "stage": "train.algo",
    "output_dir": "run.run_dir",
    "chat_template_path": "run.chat_template",  # TRL
    "default_system": "run.system_prompt",  # LLaMA-Factory
    "model_name_or_path": "run.model",
    "model_name": "run.model",
    "trust_remote_code": "run.trust_remote_code",
    "dataset_name": "load.source",
    "dataset": "load.source",
    "per_device_eval_batch_size": "eval.batch_size",
    "max_new_tokens": "sample.max_tokens",
    "num_generations": "sample.n",
    "num_samples": "sample.n",
    "push_to_hub": "|solopo does not upload; push the trained folder with `hf upload ORG/NAME "
    "RUN_DIR/train/models/ALGO-MODE` (the export: `hf upload ORG/NAME RUN_DIR/export --repo-type dataset`)",
    "hub_model_id": "|solopo does not upload; see push_to_hub",
}


def _section_keys() -> dict[str, list[str]]:
    return {"run": list(RunSettings.model_fields), **{n: list(c.model_fields) for n, c in sections().items()}}


def unknown_key_hint(loc: tuple[str, ...]) -> str:
    """'did you mean ...' for an unknown config key: the solopo name of an HF/TRL/LLaMA-Factory name, the same key in
    another section, or a close spelling (difflib) in this section or among the sections."""
    import difflib

    keys = _section_keys()
    if len(loc) == 1:  # an unknown section
        if HF_NAMES.get(loc[0], "|").partition("|")[0]:
            return f"did you mean {HF_NAMES[loc[0]].partition('|')[0]}? (settings go under their section)"
        close = difflib.get_close_matches(loc[0], list(keys), n=1, cutoff=0.6)
        return f"did you mean section {close[0]}?" if close else ""
    section, key = loc[0], loc[-1]
    if key in HF_NAMES:
        target, _, why = HF_NAMES[key].partition("|")
        if target and target.split(".")[1] in keys.get(section, []):
            target = f"{section}.{target.split('.')[1]}"  # e.g. max_new_tokens under eval: eval.max_tokens
        if target and target != f"{section}.{key}":
            return f"did you mean {target}? ({key} is the HF/TRL/LLaMA-Factory name{'; ' + why if why else ''})"
        if not target:
            return why
    elsewhere = [f"{s}.{key}" for s, ks in keys.items() if key in ks and s != section]
    if elsewhere:
        return f"did you mean {' or '.join(elsewhere)}?"
    close = difflib.get_close_matches(key, keys.get(section, []), n=1, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(f'{section}.{c}' for c in close)}?"
    every = [f"{s}.{k}" for s, ks in keys.items() for k in ks]
    close = difflib.get_close_matches(key, [e.split(".", 1)[1] for e in every], n=1, cutoff=0.75)
    if close:
        return "did you mean " + " or ".join(e for e in every if e.endswith("." + close[0])) + "?"
    return ""


_UNION_TAGS = {"int", "float", "str", "bool", "none", "list", "dict"}


def _is_union_branch(part: Any) -> bool:
    """pydantic names each branch of an `int | Literal["auto"]` field in the error's loc ('constrained-int',
    "literal['auto']"): not a key the user wrote."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part.startswith("constrained-"))


def _format_errors(err: ValidationError) -> list[str]:
    out: list[str] = []
    unions: dict[str, tuple[int, list[str], Any]] = {}  # field -> (its line, what each branch wanted, the input)
    for e in err.errors():
        if e["loc"] and _is_union_branch(e["loc"][-1]):
            loc = ".".join(str(x) for x in e["loc"][:-1])
            if loc not in unions:
                unions[loc] = (len(out), [], e["input"])
                out.append("")
            unions[loc][1].append(e["msg"].removeprefix("Input should be "))
            continue
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section = str(e["loc"][0]) if e["loc"] else ""
            known = ""
            if len(e["loc"]) == 1:
                known = "; known sections: " + ", ".join(["run", *sections()])
            elif section in sections():
                known = "; known keys: " + ", ".join(sections()[section].model_fields)
            elif section == "run":
                known = "; known keys: " + ", ".join(RunSettings.model_fields)
            hint = unknown_key_hint(tuple(str(x) for x in e["loc"]))
            msg = f"unknown key{'; ' + hint if hint else ''}{known}"
        elif e["type"] == "finite_number":
            msg = f"must be a finite number, got {e['input']!r}"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        out.append(f"{loc}: {msg}")
    for loc, (i, wanted, given) in unions.items():  # one line per field, whichever branches failed
        out[i] = f"{loc}: should be {', or '.join(wanted)} (got {given!r})"
    return out


SAVED_CONFIG = "config.yaml"  # a run dir's settings, written by every command that runs stages in it


def _layer_run_dir(over: dict[str, Any], file_data: dict[str, Any], preset: str | None) -> str:
    """The run dir a command will use: flags/--set, else the config file, else the preset, else the default.
    An empty one would write stages (and config.yaml) into the current directory: refused."""
    for layer in (over, file_data, PRESETS.get(preset or "", {})):
        run = layer.get("run")
        if isinstance(run, dict) and "run_dir" in run:
            value = run["run_dir"]
            break
    else:
        value = RunSettings().run_dir
    if value is None or not str(value).strip():
        raise ConfigError(
            [
                "run.run_dir is empty: it would write stages and config.yaml into the current directory; "
                "pass a directory, e.g. --run-dir runs/mine (or --run-dir . to use this one on purpose)"
            ]
        )
    return str(value)


def saved_settings(run_dir: str | Path) -> dict[str, Any] | None:
    """A run dir's saved settings (its config.yaml) as a layer, or None when it has none. `run.run_dir` is left
    out (a copied or moved run dir is wherever it is now); `run.preset` stays a label of where the saved values came
    from (never applied again: they are in the file). A saved file that no longer validates is a ConfigError."""
    path = Path(run_dir) / SAVED_CONFIG
    if not path.is_file():
        return None
    data = read_config_file(path)
    run = data.get("run") or {}
    data["run"] = {k: v for k, v in run.items() if k != "run_dir"}
    try:
        config_model().model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            [*_format_errors(e), f"fix {path} by hand or delete it (the run dir then starts from the defaults)"],
            source=f"{path} (the run dir's saved settings)",
        ) from None
    return data


def config_layers(
    file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
    run_dir_layer: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    """The layers of a resolved config, lowest first, each named by where it came from:
    defaults < the run dir's config.yaml (`run_dir_layer`) < preset < file < overrides (--set, then flags)."""
    file_data: dict[str, Any] = {}
    if file is not None:
        file_data = read_config_file(file)
    over: dict[str, Any] = {}
    if isinstance(overrides, dict):
        over = copy.deepcopy(overrides)
    elif overrides:
        for item in overrides:
            parts, value = parse_override(item)
            set_nested(over, parts, value)
    preset = preset or over.get("run", {}).get("preset") or file_data.get("run", {}).get("preset")
    sections()  # registers presets too
    if preset and preset not in PRESETS:
        raise ConfigError([f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS)) or 'none'}"])
    layers: list[tuple[str, dict[str, Any]]] = [("defaults", {})]
    if run_dir_layer:
        rd = _layer_run_dir(over, file_data, preset)
        saved = saved_settings(rd)
        if saved is not None:
            layers.append((f"{Path(rd) / SAVED_CONFIG} (the run dir's settings)", saved))
    if preset:
        layers.append((f"preset {preset}", _deep_merge(copy.deepcopy(PRESETS[preset]), {"run": {"preset": preset}})))
    if file is not None:
        layers.append((f"file {file}", file_data))
    if over:
        layers.append(("--set / options", over))
    return layers


def build_config(
    file: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
    run_dir_layer: bool = False,
) -> BaseModel:
    """Resolve defaults < [the run dir's config.yaml] < preset < file < overrides into a validated, frozen config.
    The CLI sets `run_dir_layer`: a later command in a run dir starts from the settings of the earlier ones."""
    layers = config_layers(file, overrides, preset, run_dir_layer)
    raw: dict[str, Any] = {}
    for _, data in layers:
        _deep_merge(raw, data)
    _layer_run_dir(raw, {}, None)  # the API path too: never an empty run dir
    try:
        return config_model().model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e), source=str(file) if file is not None else None) from None


def provenance(layers: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """section.key -> the layer that last changed its resolved value (keys at their default are not listed)."""
    out: dict[str, str] = {}
    raw: dict[str, Any] = {}
    defaults = before = config_to_dict(config_model().model_validate({}))
    for name, data in layers[1:]:
        _deep_merge(raw, data)
        try:
            now = config_to_dict(config_model().model_validate(raw))
        except ValidationError:
            continue  # only valid once a later layer completes it: attributed to that layer
        for section, values in now.items():
            for k, v in values.items():
                if before.get(section, {}).get(k) != v:
                    out[f"{section}.{k}"] = name
        before = now

    def value(cfg: dict[str, Any], key: str) -> Any:
        section, leaf = key.split(".", 1)
        return cfg[section][leaf]

    return {k: v for k, v in out.items() if value(before, k) != value(defaults, k)}


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _comment(text: str, indent: str, width: int = 116) -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), width - len(indent) - 2)]


def _explain_fields(cls: type[BaseModel], values: dict[str, Any], indent: str) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        field = cls.model_fields[key]
        if field.description:
            out += _comment(field.description, indent)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):  # e.g. train.lora
            out.append(f"{indent}{key}:")
            out += _explain_fields(sub, value, indent + "  ")
            continue
        text = yaml.safe_dump({key: value}, sort_keys=False, width=1000).rstrip("\n")
        out += [f"{indent}{line}".rstrip() for line in text.split("\n")]
    return out


def explain_config(cfg: BaseModel) -> str:
    """dump_config's YAML with every field's description as a comment above it (`solopo config show --explain`);
    loading the text back gives the same config."""
    data = config_to_dict(cfg)
    classes: dict[str, type[BaseModel]] = {"run": RunSettings, **sections()}
    out: list[str] = []
    for section, values in data.items():
        cls = classes[section]
        doc = cls.__dict__.get("__doc__")
        if out:
            out.append("")
        out += _comment(doc, "") if doc else []
        out.append(f"{section}:")
        out += _explain_fields(cls, values, "  ")
    return "\n".join(out) + "\n"
