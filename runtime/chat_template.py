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

The sandbox does not bound time or size, so rendering happens in a separate
process (``chat_template_worker.py``) under limits: ``RENDER_BUDGET_S`` of
time, ``max_chars`` of output, checked arithmetic (no ``10 ** 10 ** 8``), a
capped address space, and a template source of at most
``MAX_TEMPLATE_CHARS``.  The worker is a fresh interpreter that imports only
Jinja2 (never a fork of this process, whose numba threads a fork would
break), started on first use and reused, so a render costs a pipe round trip
(well under a millisecond plus the template itself); one that overruns is
killed and replaced on the next render.

When the template is absent or fails (syntax error, an exception raised while
rendering, a sandbox violation, a limit, an empty result) the prompt falls
back to ChatML with a warning::

    <|im_start|>{role}\\n{content}<|im_end|>\\n      (for every message)
    <|im_start|>assistant\\n                        (if add_generation_prompt)

A prompt longer than ``max_chars`` is not a template failure but a prompt that
cannot fit: ``PromptTooLongError``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

__all__ = ["render_chat", "render_chatml", "ChatTemplateWarning", "PromptTooLongError",
           "prestart_worker", "stop_worker", "MAX_TEMPLATE_CHARS", "RENDER_BUDGET_S",
           "MAX_RENDER_CHARS", "MAX_CHARS_PER_TOKEN"]

# The official templates are 1-20 KB; a quarter of a megabyte is only ever an attack.
MAX_TEMPLATE_CHARS = 256 * 1024
RENDER_BUDGET_S = 2.0             # official templates render in about a millisecond
MAX_RENDER_CHARS = 1 << 24        # output cap when the caller gives none
# A prompt of more than this many characters per context token cannot fit: real
# text averages 3-5 per token, and even runs of spaces or digits stay far below
# 16.  Refusing by length costs nothing; tokenizing a huge prompt first does.
MAX_CHARS_PER_TOKEN = 16
_GRACE_S = 2.0                    # beyond the budget before the worker is killed
_STARTUP_TIMEOUT_S = 60.0         # a fresh interpreter + Jinja2 on a loaded machine
_WORKER = Path(__file__).with_name("chat_template_worker.py")


class ChatTemplateWarning(UserWarning):
    """The model's chat template was absent or failed; ChatML was used instead."""


class PromptTooLongError(ValueError):
    """The rendered prompt has more characters than the caller allows."""


class _TemplateFailure(Exception):
    """A template that could not give a prompt: the reason, for the warning."""


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The documented fallback format (ChatML, as used by Qwen and SmolLM)."""
    out = [f"<|im_start|>{m['role']}\n{_text(m.get('content'))}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", max_chars: int | None = None,
                **extra) -> str:
    """Render ``messages`` with ``template``; ChatML (+ ChatTemplateWarning) if that fails.

    ``max_chars`` bounds the prompt (PromptTooLongError beyond it): a caller
    that knows its context can refuse a prompt before tokenizing it."""
    _check_messages(messages)
    limit = MAX_RENDER_CHARS if max_chars is None else int(max_chars)
    if not template:
        warnings.warn("the model has no chat template; using ChatML", ChatTemplateWarning,
                      stacklevel=2)
        return _bounded(render_chatml(messages, add_generation_prompt), limit)
    variables = dict(extra, messages=messages, add_generation_prompt=add_generation_prompt,
                     bos_token=bos_token, eos_token=eos_token)
    try:
        text = _render_in_worker(template, variables, limit)
    except _TemplateFailure as e:
        warnings.warn(f"chat template failed ({e}); using ChatML", ChatTemplateWarning,
                      stacklevel=2)
        return _bounded(render_chatml(messages, add_generation_prompt), limit)
    if not text and messages:
        # nothing to evaluate: a broken template, not an empty conversation
        warnings.warn("chat template rendered an empty prompt; using ChatML", ChatTemplateWarning,
                      stacklevel=2)
        return _bounded(render_chatml(messages, add_generation_prompt), limit)
    return text


def _bounded(text: str, limit: int) -> str:
    if len(text) > limit:
        raise PromptTooLongError(f"the chat prompt has {len(text)} characters, more than the "
                                 f"{limit} allowed")
    return text


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


# ------------------------------------------------------------ the worker

def _render_in_worker(template: str, variables: dict, max_chars: int) -> str:
    if not isinstance(template, str):
        raise _TemplateFailure(f"TypeError: the template is a {type(template).__name__}, not text")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise _TemplateFailure(f"TemplateTooLarge: {len(template)} characters, more than the "
                               f"{MAX_TEMPLATE_CHARS} allowed")
    try:
        request = json.dumps({"template": template, "variables": variables,
                              "max_chars": max_chars, "budget_s": RENDER_BUDGET_S},
                             ensure_ascii=True)  # lone surrogates survive as \\udXXX escapes
    except (TypeError, ValueError) as e:
        raise ValueError(f"chat template variables must be JSON-like "
                         f"(dicts, lists, strings, numbers): {e}") from None
    reply = _worker.request(request.encode("ascii") + b"\n")
    if "text" in reply:
        return reply["text"]
    if "too_long" in reply:
        raise PromptTooLongError(f"the chat template rendered more than {max_chars} characters "
                                 f"(the limit for this prompt)")
    if "timeout" in reply:
        raise _TemplateFailure(f"TimeoutError: it ran past {RENDER_BUDGET_S:g} s")
    kind, msg = reply.get("error", ["Error", "no answer"])
    raise _TemplateFailure(f"{kind}: {msg}")


class _Worker:
    """The render process: started lazily, reused, replaced after a failure."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buf = b""

    def start(self) -> None:
        """Launch the process if none is running; do not wait for it."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._discard()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, str(_WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, bufsize=0, close_fds=True,
                # its own session: the terminal's Ctrl-C / Ctrl-Z are for the chat, not for it
                start_new_session=True)
        except OSError as e:
            raise _TemplateFailure(f"WorkerError: cannot start the template process: {e}") from None
        self._ready = False
        self._buf = b""

    def request(self, line: bytes) -> dict:
        with self._lock:
            for attempt in (1, 2):
                self.start()
                try:
                    if not self._ready:
                        if self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S) is None:
                            raise _TemplateFailure("WorkerError: the template process did not start")
                        self._ready = True
                    self._write(line)
                    break
                except (BrokenPipeError, _TemplateFailure):
                    # a process that died while idle (killed from outside): one fresh try
                    self._discard()
                    if attempt == 2:
                        raise _TemplateFailure("WorkerError: the template process is not "
                                               "answering") from None
                except BaseException:  # Ctrl-C half-way through a request: start clean next time
                    self._discard()
                    raise
            try:
                reply = self._read_line(time.monotonic() + RENDER_BUDGET_S + _GRACE_S)
            except BaseException:
                # e.g. Ctrl-C while waiting: its answer would come late and be taken
                # for the next render's; a fresh process keeps the pipe in step
                self._discard()
                raise
            if reply is None:  # hung in C code, or crashed: kill it; the next render starts another
                code = self._proc.poll()
                self._discard()
                if code is None:
                    raise _TemplateFailure(f"TimeoutError: it ran past {RENDER_BUDGET_S:g} s")
                raise _TemplateFailure(f"WorkerError: the template process died (exit status {code})")
            return reply

    def _write(self, data: bytes) -> None:
        fd = self._proc.stdin.fileno()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def _read_line(self, deadline: float) -> dict | None:
        """One JSON reply, or None if the process died or the deadline passed."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return None

    def _discard(self) -> None:
        """End the process (if any) and forget it."""
        proc, self._proc, self._ready, self._buf = self._proc, None, False, b""
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                try:
                    proc.stdin.close()  # the polite way: it exits at end of input
                    proc.wait(timeout=1)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._discard()

    def _forget_after_fork(self) -> None:
        # A forked child must not talk over its parent's pipes, nor kill its worker;
        # it closes its copies so that the worker still sees end of input when the
        # parent goes.  Its own first render starts its own worker.
        proc, self._proc, self._ready, self._buf = self._proc, None, False, b""
        self._lock = threading.Lock()
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass


_worker = _Worker()
atexit.register(_worker.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_worker._forget_after_fork)


def prestart_worker() -> None:
    """Start the render process now, in the background (e.g. while a model
    loads), so that the first render does not wait for it.  Never raises."""
    try:
        with _worker._lock:
            _worker.start()
    except _TemplateFailure:
        pass


def stop_worker() -> None:
    """End the render process (it is also ended at exit); the next render starts one."""
    _worker.stop()
