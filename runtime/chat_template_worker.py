"""The process that renders chat templates (run as a script by chat_template.py).

A GGUF's chat template is a program written by a stranger, and Jinja2's
sandbox bounds what it may touch, not how long it runs or how much it makes:
``{% for i in range(100000) %}{% for j in range(100000) %}`` loops for hours.
So templates run here, in a separate interpreter that the caller can kill,
and every render has three limits:

* time: an interval timer interrupts a render past its budget (the caller
  kills this process if even that does not answer in time);
* output: rendering is streamed and stops once the text passes ``max_chars``;
* arithmetic: ``**``, ``*`` and ``+`` are checked before they run, so
  ``10 ** (10 ** 8)`` or ``'a' * 10 ** 10`` is refused instead of computed
  (a single C-level operation like those could not be interrupted), and the
  address space is capped, so any other giant allocation fails fast.

This file imports only the standard library and Jinja2 and never the
``runtime`` package (which sets up numba): starting it costs a fresh
interpreter plus Jinja2, about a tenth of a second.

Protocol, one JSON object per line: this process says ``{"ready": true}``
once, then answers each request ``{"template", "variables", "max_chars",
"budget_s"}`` with one of ``{"text": ...}``, ``{"error": [type, message]}``,
``{"too_long": max_chars}`` or ``{"timeout": budget_s}``.  It exits when its
input closes (its parent is gone).
"""

import json
import os
import signal
import sys

# Run as a script, this file's folder (runtime/) heads sys.path, where
# gguf.py would shadow the gguf package: take it off before importing anything.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

from datetime import datetime  # noqa: E402
from functools import lru_cache  # noqa: E402

import jinja2  # noqa: E402
from jinja2 import nodes  # noqa: E402
from jinja2.exceptions import SecurityError  # noqa: E402
from jinja2.ext import Extension  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

MAX_LENGTH = 1 << 24      # longest string or list a template may build with + or *
MAX_INT_BITS = 1 << 16    # largest integer (in bits) ** and * may produce
MEMORY_HEADROOM = 1 << 30  # address space allowed beyond what the idle worker uses


class Overrun(BaseException):
    """Raised by the timer inside a render.  A BaseException, so that no
    ``except Exception`` inside Jinja2 can swallow it."""


class TooLong(Exception):
    pass


# ------------------------------------------------------------ the sandbox

def _check_power(base, exp):
    if (isinstance(base, int) and isinstance(exp, int) and exp > 1 and abs(base) > 1
            and exp * (abs(base).bit_length() - 1) > MAX_INT_BITS):
        raise SecurityError(f"the power {base} ** {exp} is too large to compute")


def _check_product(a, b):
    if isinstance(a, int) and isinstance(b, int):
        if a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise SecurityError("the product is too large to compute")
        return
    seq, n = (a, b) if isinstance(b, int) else (b, a)
    if isinstance(n, int) and isinstance(seq, (str, list, tuple)) and len(seq) * n > MAX_LENGTH:
        raise SecurityError(f"'*' would make a {type(seq).__name__} of {len(seq) * n} items "
                            f"(at most {MAX_LENGTH})")


def _check_sum(a, b):
    if (isinstance(a, (str, list, tuple)) and isinstance(b, (str, list, tuple))
            and len(a) + len(b) > MAX_LENGTH):
        raise SecurityError(f"'+' would make a {type(a).__name__} of {len(a) + len(b)} items "
                            f"(at most {MAX_LENGTH})")


_CHECKS = {"**": _check_power, "*": _check_product, "+": _check_sum}


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox whose ``**``, ``*`` and ``+`` check their
    result's size first (intercepted operators are also never folded at
    compile time, so a constant ``10 ** 10 ** 8`` is not computed by the parser)."""

    intercepted_binops = frozenset(_CHECKS)

    def call_binop(self, context, operator, left, right):
        _CHECKS[operator](left, right)
        return super().call_binop(context, operator, left, right)


# ----------------------------------- Hugging Face's apply_chat_template setup

def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
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
def compile_template(source):
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(source, variables, max_chars):
    """The template's text, streamed so that it stops once past ``max_chars``."""
    parts, n = [], 0
    for part in compile_template(source).generate(**variables):
        n += len(part)
        if n > max_chars:
            raise TooLong
        parts.append(part)
    return "".join(parts)


# ------------------------------------------------------------ the loop

_rendering = False


def _on_alarm(signum, frame):
    global _rendering
    if _rendering:
        _rendering = False  # once: the handlers of answer() must not be interrupted
        raise Overrun


def _first_line(e):
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__


def answer(request):
    global _rendering
    budget = float(request["budget_s"])
    max_chars = int(request["max_chars"])
    _rendering = True
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        text = render(request["template"], request["variables"], max_chars)
        _rendering = False
        return {"text": text}
    except Overrun:
        return {"timeout": budget}
    except TooLong:
        return {"too_long": max_chars}
    except MemoryError:
        return {"error": ["MemoryError", "the template needed too much memory"]}
    except RecursionError:
        return {"error": ["RecursionError", "the template recursed too deep"]}
    except Exception as e:  # noqa: BLE001 - any failure of a stranger's template
        return {"error": [type(e).__name__, _first_line(e)]}
    finally:
        _rendering = False
        signal.setitimer(signal.ITIMER_REAL, 0)


def _cap_memory():
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = used + MEMORY_HEADROOM
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or soft > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError):
        pass  # not Linux: the time limit and the caller's kill remain


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it kills us if needed
    signal.signal(signal.SIGALRM, _on_alarm)
    _cap_memory()
    out = sys.stdout.buffer

    def send(obj):
        out.write(json.dumps(obj, ensure_ascii=True).encode("ascii") + b"\n")
        out.flush()

    send({"ready": True})
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
        except ValueError as e:
            send({"error": ["ValueError", f"bad request: {e}"]})
            continue
        try:
            reply = answer(request)
        except Overrun:  # the timer went off just as a render was ending
            reply = {"timeout": request.get("budget_s")}
        except Exception as e:  # noqa: BLE001 - a malformed request: say so, keep serving
            reply = {"error": [type(e).__name__, f"bad request: {_first_line(e)}"]}
        send(reply)


if __name__ == "__main__":
    main()
