"""Chat prompts from a GGUF's ``tokenizer.chat_template`` (Jinja2, sandboxed).

Templates come from strangers, so they run in Jinja2's
``ImmutableSandboxedEnvironment`` (no attribute access to internals, no
mutation of the inputs, bounded ``range``), set up the way Hugging Face's
``apply_chat_template`` does so that official templates render identically:
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
filter that keeps non-ASCII text, and the ``raise_exception`` and
``strftime_now`` helpers.  The variables are ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra keyword
(``tools``, ``enable_thinking``, ...).

When the template is absent or fails (syntax error, an exception raised while
rendering, a sandbox violation) the prompt falls back to ChatML with a warning::

    <|im_start|>{role}\\n{content}<|im_end|>\\n      (for every message)
    <|im_start|>assistant\\n                        (if add_generation_prompt)
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["render_chat", "render_chatml", "ChatTemplateWarning"]


class ChatTemplateWarning(UserWarning):
    """The model's chat template was absent or failed; ChatML was used instead."""


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The documented fallback format (ChatML, as used by Qwen and SmolLM)."""
    out = [f"<|im_start|>{m['role']}\n{_text(m.get('content'))}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render ``messages`` with ``template``; ChatML (+ ChatTemplateWarning) if that fails."""
    _check_messages(messages)
    if not template:
        warnings.warn("the model has no chat template; using ChatML", ChatTemplateWarning,
                      stacklevel=2)
        return render_chatml(messages, add_generation_prompt)
    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except Exception as e:  # noqa: BLE001 - any failure of a stranger's template
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(f"chat template failed ({type(e).__name__}: {msg}); using ChatML",
                      ChatTemplateWarning, stacklevel=2)
        return render_chatml(messages, add_generation_prompt)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} must be a dict with a string 'role'")


def _text(content) -> str:
    """Message content as text (OpenAI-style lists of parts keep their text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """Hugging Face's ``{% generation %}...{% endgeneration %}`` (marks assistant
    text for training masks): here it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
