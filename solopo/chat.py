"""How a prompt becomes token ids: the chat template (the tokenizer's own, or `run.chat_template`) applied to an
optional system message (`run.system_prompt`) and the user message, with the assistant generation prompt.

Every place that turns a prompt into ids goes through one ChatFormat: synth's token counts, sampling and eval
(both backends, Ray replicas), training (and export's turn counts), and export's TRL `messages`. So the ids a
prompt was counted with are the ids it is sampled, trained and evaluated with.

    chat = chat_format(cfg.run)                    # reads a template file once; ConfigError naming the setting
    ids = chat.prompt_ids(tokenizer, user_content)  # prompt + generation prompt
    full = chat.full_ids(tokenizer, user_content, answer)
    chat.fingerprint()                              # {} for the defaults: existing cache keys are unchanged
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solopo.pipeline.errors import ConfigError, SolopoError

TEMPLATE_SETTING = "run.chat_template"
SYSTEM_SETTING = "run.system_prompt"

NO_TEMPLATE = (
    "the model's tokenizer has no chat template; use an instruct/chat checkpoint (prompts are chat messages), "
    f"or give one with {TEMPLATE_SETTING} (a .jinja file or an inline Jinja template)"
)


@dataclass(frozen=True)
class ChatFormat:
    """The chat template override (None: the tokenizer's own) and the system message (None: none).

    Plain strings only: it travels pickled to Ray replicas and as JSON in the training ranks' spec."""

    template: str | None = None  # Jinja text of run.chat_template
    source: str | None = None  # what run.chat_template said: a path as given, or "inline"
    system_prompt: str | None = None

    @property
    def is_default(self) -> bool:
        return self.template is None and self.system_prompt is None

    @property
    def template_sha256(self) -> str | None:
        return None if self.template is None else hashlib.sha256(self.template.encode()).hexdigest()

    @property
    def source_name(self) -> str | None:
        """run.chat_template as cards and reports show it: the file's name (no machine path), "inline" or None."""
        return self.source if self.source in (None, "inline") else Path(str(self.source)).name

    def settings(self) -> dict[str, Any]:
        """The setting (by file name), the hash of the text used, the system message; None for each default."""
        return {
            "chat_template": self.source_name,
            "chat_template_sha256": self.template_sha256,
            "system_prompt": self.system_prompt,
        }

    def describe(self) -> dict[str, Any]:
        """What the data card's construction settings record: settings(), empty for the defaults."""
        return {} if self.is_default else self.settings()

    def fingerprint(self) -> dict[str, Any]:
        """The part of a stage fingerprint that depends on the chat format: the template's text (by hash, not its
        path: a moved file is the same template) and the system message; nothing for the defaults, so that run dirs
        made before these settings existed keep their keys."""
        if self.is_default:
            return {}
        return {"chat": {"chat_template_sha256": self.template_sha256, "system_prompt": self.system_prompt}}

    def card_text(self) -> str:
        """One sentence for data and model cards naming what differs from the model's own chat format."""
        parts = []
        if self.template is not None:
            where = "an inline template" if self.source == "inline" else f"`{self.source_name}`"
            parts.append(
                f"the chat template of `{TEMPLATE_SETTING}` ({where}, sha256 {str(self.template_sha256)[:12]}) "
                "instead of the model's own"
            )
        else:
            parts.append("the model's own chat template")
        if self.system_prompt is not None:
            parts.append(
                f"the system message {json.dumps(self.system_prompt)} (`{SYSTEM_SETTING}`) before every prompt"
            )
        return "Prompt format: " + ", with ".join(parts) + "."

    # --- messages ----------------------------------------------------------------------------------------
    def messages(self, user: str, assistant: str | None = None) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        out.append({"role": "user", "content": user})
        if assistant is not None:
            out.append({"role": "assistant", "content": assistant})
        return out

    # --- rendering ---------------------------------------------------------------------------------------
    def has_template(self, tokenizer: Any) -> bool:
        return self.template is not None or bool(getattr(tokenizer, "chat_template", None))

    def render(self, tokenizer: Any, user: str, assistant: str | None = None) -> str:
        """The conversation as text: prompt + generation prompt, or prompt + assistant turn."""
        if not self.has_template(tokenizer):
            if self.system_prompt is not None:
                raise ConfigError(
                    [f"{SYSTEM_SETTING}: the model's tokenizer has no chat template to place a system message in; "
                     f"give {TEMPLATE_SETTING} or unset {SYSTEM_SETTING}"]
                )  # fmt: skip
            raise SolopoError(NO_TEMPLATE)
        try:
            return tokenizer.apply_chat_template(
                self.messages(user, assistant),
                chat_template=self.template,
                add_generation_prompt=assistant is None,
                tokenize=False,
            )
        except Exception as e:  # jinja2 errors, raise_exception() in the template, TypeError on odd fields
            raise self._render_error(tokenizer, e) from None

    def prompt_ids(self, tokenizer: Any, user: str) -> list[int]:
        """Ids of [system?, user] with the assistant generation prompt: what a model generates after."""
        return _encode(tokenizer, self.render(tokenizer, user))

    def full_ids(self, tokenizer: Any, user: str, assistant: str) -> list[int]:
        """Ids of [system?, user, assistant]: the prompt plus the completion with its end-of-turn tokens."""
        return _encode(tokenizer, self.render(tokenizer, user, assistant))

    def check(self, tokenizer: Any) -> None:
        """Render a probe conversation both ways: a template that cannot render fails here, as a config error,
        before any work (not inside a sampling batch or a training rank)."""
        if self.is_default:
            return
        self.render(tokenizer, "Question?")
        self.render(tokenizer, "Question?", "Answer.")

    def apply_to(self, tokenizer: Any) -> None:
        """Make the tokenizer carry the template used (a saved model then serves with it: chat_template.jinja)."""
        if self.template is not None:
            tokenizer.chat_template = self.template

    def _render_error(self, tokenizer: Any, e: Exception) -> ConfigError:
        which = f"{TEMPLATE_SETTING}={self.source}" if self.template is not None else "the tokenizer's chat template"
        if self.system_prompt is not None:
            try:  # the same conversation without the system message: is the system role the problem?
                ChatFormat(self.template, self.source, None).render(tokenizer, "Question?")
                return ConfigError(
                    [f"{SYSTEM_SETTING}: {which} rejects a system message ({type(e).__name__}: {e}); unset "
                     f"{SYSTEM_SETTING}, or give a {TEMPLATE_SETTING} that accepts the system role"]
                )  # fmt: skip
            except ConfigError:
                pass
        fix = (
            f"fix the template, or unset {TEMPLATE_SETTING} to use the tokenizer's own"
            if self.template is not None
            else f"give a template that renders with {TEMPLATE_SETTING}"
        )
        return ConfigError([f"{TEMPLATE_SETTING}: {which} does not render ({type(e).__name__}: {e}); {fix}"])

    # --- the training ranks' spec ------------------------------------------------------------------------
    def to_spec(self) -> dict[str, Any]:
        return {"template": self.template, "source": self.source, "system_prompt": self.system_prompt}

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> ChatFormat:
        spec = spec or {}
        return cls(spec.get("template"), spec.get("source"), spec.get("system_prompt"))


def _encode(tokenizer: Any, text: str) -> list[int]:
    # As apply_chat_template(tokenize=True) does it: the template carries its own special tokens.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_format(run: Any) -> ChatFormat:
    """The ChatFormat of a run's settings (anything with `chat_template` and `system_prompt`, e.g. cfg.run)."""
    value = getattr(run, "chat_template", None)
    system = getattr(run, "system_prompt", None)
    if value is None:
        return ChatFormat(None, None, system)
    if _is_inline(value):
        return ChatFormat(_checked(value, "inline"), "inline", system)
    path = Path(value).expanduser()
    try:
        st = path.stat()
    except OSError:
        raise ConfigError(
            [f"{TEMPLATE_SETTING}: no such file: {value} (give a .jinja file, or an inline Jinja template, i.e. text "
             f"with {{{{ or {{%; unset it to use the tokenizer's own)"]
        ) from None  # fmt: skip
    return ChatFormat(_read_template(str(path), st.st_mtime_ns, st.st_size), value, system)


def _is_inline(value: str) -> bool:
    """vLLM's rule for --chat-template: Jinja markup is a template, anything else a path."""
    return "{{" in value or "{%" in value


@functools.lru_cache(maxsize=32)
def _read_template(path: str, mtime_ns: int, size: int) -> str:
    """A template file's text, read once per process (and again only when the file changes)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{TEMPLATE_SETTING}: {path} is not a file (give a .jinja file or an inline template)"])
    try:
        text = p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{TEMPLATE_SETTING}: cannot read {path} as UTF-8 text ({e})"]) from None
    if p.suffix == ".json":  # HF's chat_template.json: {"chat_template": "..."}
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                [f"{TEMPLATE_SETTING}: {path} is not an HF chat_template.json with a 'chat_template' string ({e})"]
            ) from None
        if not isinstance(text, str):
            raise ConfigError([f"{TEMPLATE_SETTING}: 'chat_template' in {path} is not a string"])
    return _checked(text, path)


def _checked(text: str, where: str) -> str:
    """The template text, once it is non-empty and parses as Jinja (rendering is checked with a tokenizer)."""
    if not text.strip():
        raise ConfigError([f"{TEMPLATE_SETTING}: the template ({where}) is empty"])
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # transformers renders in this environment (with loopcontrols)
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            [f"{TEMPLATE_SETTING}: the template ({where}) is not valid Jinja: {e.message} (template line {e.lineno})"]
        ) from None
    return text


__all__ = ["NO_TEMPLATE", "SYSTEM_SETTING", "TEMPLATE_SETTING", "ChatFormat", "chat_format"]
