"""``python -m runtime chat [MODEL]``: talk to a model.

The conversation is rendered with the GGUF's own chat template every turn
and tokenized whole; the tokens already in the KV cache that match the start
of that rendering are kept (``session.rewind`` to the common prefix) and only
the rest is evaluated, so turn N costs the new message, not the whole
conversation.  When the conversation no longer fits, the oldest turns go
(the system prompt stays) and the user is told.

Interactive (a terminal): a ``> `` prompt with line editing, the reply
streamed; Ctrl-C stops the reply and returns to the prompt; Ctrl-D or
``/exit`` quits.  Piped stdin: one message per line, and only the replies on
stdout (one per line), so it can be scripted.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time

from .cli import CLIError
from .generate import Timings, cut_short_message, load_model, stream_reply
from .reasoning import ReasoningSplitter, starts_thinking
from .sampling import Sampler, SamplerParams

__all__ = ["ChatSession", "cli_chat", "DEFAULT_MODEL", "render_prompt", "special_texts", "write_reply"]

DEFAULT_MODEL = "smollm2-135m-instruct"

HELP = """commands:
  /help              this text
  /exit              quit (or Ctrl-D)
  /reset             forget the conversation (keeps the system prompt)
  /system TEXT       set the system prompt (/system alone shows it)
  /set KEY VALUE     sampling: temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                     presence_penalty, frequency_penalty, seed; and n_predict
  /set               show the current settings
  /stats             speed of the last reply and context use
Ctrl-C stops a reply and returns to the prompt."""


def _parse_number(key: str, value: str, kind):
    """``/set`` values: a finite number ("nan" or "inf" would poison every logit),
    an integer where the setting counts something (1e3 is accepted as 1000)."""
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{key} needs a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if kind is int:
        if not x.is_integer():
            raise ValueError(f"{key} needs a whole number, got {value!r}")
        return int(value) if value.strip().lstrip("+-").isdigit() else int(x)
    return x


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def special_texts(tokenizer) -> tuple[str, str]:
    """BOS and EOS as text, for the templates' bos_token / eos_token."""
    def text(i):
        return tokenizer.token_to_piece(i, True).decode("utf-8", "replace") if i is not None else ""

    return text(tokenizer.bos_id), text(tokenizer.eos_id)


def render_prompt(tokenizer, template: str | None, messages: list[dict], *, max_chars: int | None = None,
                  **template_kwargs) -> tuple[list[int], str]:
    """A conversation as the prompt of the next assistant turn: (token ids, text).

    The GGUF's template (ChatML when it has none), then our tokenizer with special
    tokens parsed; BOS is added where the vocabulary asks for it unless the template
    wrote it itself.  ``template_kwargs`` become template variables
    (``enable_thinking``).  Raises chat_template.PromptTooLongError when the text
    exceeds ``max_chars``.  ``chat`` and the server both build prompts here."""
    from .chat_template import render_chat

    bos_text, eos_text = special_texts(tokenizer)
    text = render_chat(template, messages, add_generation_prompt=True, bos_token=bos_text,
                       eos_token=eos_text, max_chars=max_chars, **template_kwargs)
    add_special = not (tokenizer.add_bos and bos_text and text.startswith(bos_text))
    return tokenizer.tokenize(text, add_special=add_special, parse_special=True), text


class ChatSession:
    """A conversation over one model and one KV cache.

    ``n_evaluated`` counts every token fed to the model; ``last_prefill`` is
    how many the last turn's prompt needed (tests check the cache reuse with
    them)."""

    def __init__(self, model, *, system: str | None = None, params: SamplerParams | None = None,
                 n_predict: int = -1, notify=None, constraint=None, reasoning_format: str = "deepseek",
                 think: bool | None = None, template_kwargs: dict | None = None):
        self.model = model
        self.tokenizer = model.tokenizer
        self.n_ctx = model.n_ctx
        self.system = system
        # a constraint (runtime.constraint) holds every reply to a schema or grammar
        self.constraint = constraint
        self.sampler = Sampler(params or SamplerParams(), constraint=constraint)
        self.n_predict = n_predict
        self.notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.template = model.gguf.get("tokenizer.chat_template")
        if self.template:
            from .chat_template import prestart_worker

            prestart_worker()  # the template process starts while the user types
        if reasoning_format not in ("deepseek", "none"):
            raise ValueError(f"reasoning_format must be 'deepseek' or 'none', got {reasoning_format!r}")
        # deepseek: a reasoning model's <think> block is told apart from the answer
        # (reply_parts); none: it is part of the reply text, tags and all
        self.reasoning_format = reasoning_format
        # template variables; think True/False is enable_thinking (Qwen3's switch),
        # None leaves the template's own default
        self.template_kwargs = dict(template_kwargs or {})
        if think is not None:
            self.template_kwargs["enable_thinking"] = bool(think)
        self.prompt_text = ""              # the last rendered prompt (does it open <think>?)
        self.session = model.session()
        self.messages: list[dict] = []     # user/assistant turns, system kept apart
        self.cached: list[int] = []        # tokens in the KV cache, in order (len == n_past)
        self.n_evaluated = 0
        self.last_prefill = 0
        self.timings = Timings()
        self._stop = False

    # ------------------------------------------------------------ prompt
    def render(self, messages: list[dict]) -> tuple[list[int], str]:
        """The conversation's prompt: (tokens, text).  PromptTooLongError when its
        text is too long to fit at all (refused before tokenizing it).

        Earlier replies are stored whole, thinking included: whether it reaches the
        prompt again is the template's decision (Qwen3's and the R1 distills' drop
        it), and where that makes the rendering differ from the cache, _prefill
        keeps the longest common prefix."""
        from .chat_template import MAX_CHARS_PER_TOKEN

        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return render_prompt(self.tokenizer, self.template, full, max_chars=MAX_CHARS_PER_TOKEN * self.n_ctx,
                             **self.template_kwargs)

    def render_ids(self, messages: list[dict]) -> list[int]:
        return self.render(messages)[0]

    def _fit(self) -> list[int]:
        """Render the conversation, dropping the oldest turns until it fits
        with room for a reply."""
        from .chat_template import MAX_CHARS_PER_TOKEN, PromptTooLongError

        room = self.n_predict if self.n_predict > 0 else min(256, self.n_ctx // 4)
        dropped = 0
        while True:
            try:
                ids, self.prompt_text = self.render(self.messages)
            except PromptTooLongError:
                ids = None  # too long to tokenize, so too long to fit: like too many tokens
            if (ids is not None and len(ids) + room <= self.n_ctx) or len(self.messages) <= 1:
                break
            # drop the oldest exchange: a user message and the reply to it
            n = 2 if len(self.messages) >= 3 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:n]
            dropped += 1
        if dropped:
            self.notify(f"[context full: dropped the {dropped} oldest turn{'s' if dropped > 1 else ''}"
                        f"{' (kept the system prompt)' if self.system else ''}]")
        if ids is None:
            self.messages.pop()
            raise CLIError(f"the prompt would have more than {MAX_CHARS_PER_TOKEN * self.n_ctx} "
                           f"characters ({MAX_CHARS_PER_TOKEN} per token) but the context holds "
                           f"{self.n_ctx} tokens (raise -c/--ctx-size or shorten the "
                           f"message/system prompt)")
        if not ids:
            self.messages.pop()
            raise CLIError("the chat prompt is empty (no tokens)")
        if len(ids) >= self.n_ctx:
            self.messages.pop()
            raise CLIError(f"the message needs {len(ids)} tokens but the context holds {self.n_ctx} "
                           f"(raise -c/--ctx-size or shorten the message/system prompt)")
        return ids

    def _prefill(self, ids: list[int]) -> None:
        keep = _common_prefix(ids, self.cached)
        keep = min(keep, len(ids) - 1)   # evaluate at least one token: we need its logits
        if keep < len(self.cached):
            self.session.rewind(len(self.cached) - keep)   # drops the last n positions
            del self.cached[keep:]
            # a sliding-window cache that lost what the kept prefix needs replays it
            self.n_evaluated += getattr(self.session, "reprocessed", 0)
        new = ids[keep:]
        t0 = time.perf_counter()
        self.session.eval(new)
        self.cached.extend(new)
        self.timings = Timings(n_prompt=len(new), t_prompt=time.perf_counter() - t0)
        self.last_prefill = len(new)
        self.n_evaluated += len(new)

    # ------------------------------------------------------------ a turn
    def stop(self) -> None:
        """Ask the current reply to end after its current token (signal-safe)."""
        self._stop = True

    def reply(self, text: str):
        """Yield the reply to ``text`` piece by piece; the turn is recorded
        (even when stopped early)."""
        self._stop = False
        self.messages.append({"role": "user", "content": text})
        ids = self._fit()
        try:
            self._prefill(ids)
        except BaseException:
            # an interrupted prefill leaves the cache in an unknown state
            self.session.reset()
            self.cached.clear()
            self.messages.pop()
            raise
        history = list(self.cached)
        out: list[str] = []
        before = len(self.cached)
        self.sampler.reset()  # each reply starts at the top of the constraint's grammar
        try:
            for piece in stream_reply(self.session, self.tokenizer, self.sampler,
                                      n_predict=self.n_predict, n_ctx=self.n_ctx, history=history,
                                      evaluated=self.cached, should_stop=lambda: self._stop,
                                      timings=self.timings):
                out.append(piece)
                yield piece
        finally:
            self.n_evaluated += len(self.cached) - before
            self.messages.append({"role": "assistant", "content": "".join(out)})
        if self.timings.stop == "context":
            self.notify("[context full: reply cut; the oldest turns will be dropped next]")
        cut = cut_short_message(self.timings, self.constraint, self.n_predict, self.n_ctx)
        if cut and self.timings.stop != "interrupted":
            self.notify(f"[{cut}]")

    def reply_parts(self, text: str):
        """``reply``, with a reasoning model's thinking told apart from its answer:
        yields ("thinking", text) and ("answer", text) pieces.  The block between
        ``<think>`` and ``</think>`` is thinking, also when the prompt itself opened
        it (the R1 distills), wherever the stream splits the tags; with
        reasoning_format "none" everything is answer, tags included."""
        split = None
        for piece in self.reply(text):
            if self.reasoning_format == "none":
                yield "answer", piece
                continue
            if split is None:  # the prompt is rendered by now (reply renders it first)
                split = ReasoningSplitter(starts_thinking(self.prompt_text))
            think, answer = split.feed(piece)
            if think:
                yield "thinking", think
            if answer:
                yield "answer", answer
        if split is not None:
            think, answer = split.flush()
            if think:
                yield "thinking", think
            if answer:
                yield "answer", answer

    def say(self, text: str) -> str:
        return "".join(self.reply(text))

    # ------------------------------------------------------------ commands
    def reset(self) -> None:
        self.messages.clear()
        self.session.reset()
        self.cached.clear()

    def set(self, key: str, value: str) -> str:
        key = key.replace("-", "_")
        if key == "n_predict":
            self.n_predict = _parse_number(key, value, int)
            return f"n_predict = {self.n_predict}"
        params = self.sampler.params
        names = {f.name: f.type for f in dataclasses.fields(params)}
        if key not in names:
            raise ValueError(f"unknown setting {key!r} (one of: {', '.join(names)}, n_predict)")
        t = names[key]
        kind = {"int": int, "float": float}[t if isinstance(t, str) else t.__name__]
        v = _parse_number(key, value, kind)
        new = dataclasses.replace(params, **{key: v})   # validates
        self.sampler.params = new
        if key == "seed":
            self.sampler.reseed(v)
        return f"{key} = {v}"

    def settings(self) -> str:
        d = self.sampler.params.as_dict()
        d["n_predict"] = self.n_predict
        return "  ".join(f"{k}={v}" for k, v in d.items())

    def stats(self) -> str:
        t = self.timings
        return (f"last reply: prompt {t.n_prompt} tokens at {t.prompt_tps:.1f} tokens/s, "
                f"generation {t.n_gen} tokens at {t.gen_tps:.1f} tokens/s\n"
                f"context: {self.session.n_past}/{self.n_ctx} tokens used, "
                f"{len(self.messages)} messages, {self.n_evaluated} tokens evaluated in all")

    def command(self, line: str) -> str | None:
        """Run a /command; returns text to show, or None for /exit."""
        cmd, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return None
        if cmd == "/help":
            return HELP
        if cmd == "/reset":
            self.reset()
            return "[conversation reset]"
        if cmd == "/system":
            if not rest:
                return f"system prompt: {self.system!r}"
            self.system = rest
            return "[system prompt set]"
        if cmd == "/set":
            if not rest:
                return self.settings()
            parts = rest.split()
            if len(parts) != 2:
                raise ValueError("usage: /set KEY VALUE (e.g. /set temp 0.7)")
            return self.set(*parts)
        if cmd == "/stats":
            return self.stats()
        raise ValueError(f"unknown command {cmd} (/help lists them)")


# ---------------------------------------------------------------- the loop

DIM, UNDIM = "\x1b[2m", "\x1b[22m"   # SGR faint on / normal intensity


def write_reply(chat: ChatSession, text: str, out, thinking_out=None, *, dim: bool = False,
                hide_thinking: bool = False) -> None:
    """Stream the reply to ``text``: the answer to ``out``, a reasoning model's
    thinking to ``thinking_out`` (``out`` when None), in faint text when ``dim``
    (a terminal), or nowhere with ``hide_thinking``.  Where both go to the same
    stream a line break separates the thinking from the answer."""
    think_out = out if thinking_out is None else thinking_out
    faint = False       # an SGR faint run is open on think_out
    pending_break = False
    wrote_thinking = False
    try:
        for kind, piece in chat.reply_parts(text):
            if kind == "thinking":
                if hide_thinking:
                    continue
                if dim and not faint:
                    think_out.write(DIM)
                    faint = True
                think_out.write(piece)
                think_out.flush()
                wrote_thinking = pending_break = True
                continue
            if faint:
                think_out.write(UNDIM)
                faint = False
            if pending_break and think_out is out:
                out.write("\n")
            pending_break = False
            out.write(piece)
            out.flush()
    finally:
        if faint:
            think_out.write(UNDIM)
        if wrote_thinking and think_out is not out:
            think_out.write("\n")   # the thinking of one reply is one block of lines
        think_out.flush()


def _interactive(chat: ChatSession, name: str, hide_thinking: bool = False) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    out = sys.stdout
    print(f"chatting with {name} (context {chat.n_ctx} tokens). /help for commands, Ctrl-D to quit.",
          file=out, flush=True)

    def on_sigint(signum, frame):
        chat.stop()

    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("^C (Ctrl-D or /exit quits)", file=out, flush=True)
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            try:
                msg = chat.command(line)
            except ValueError as e:
                msg = f"error: {e}"
            if msg is None:
                return 0
            print(msg, file=out, flush=True)
            continue
        # During a reply Ctrl-C only raises a flag that the loop checks
        # between tokens, so the KV cache never sees half a step.
        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            write_reply(chat, line, out, dim=out.isatty(), hide_thinking=hide_thinking)
        except CLIError as e:
            print(f"error: {e}", file=out, flush=True)
            continue
        finally:
            signal.signal(signal.SIGINT, old)
        if chat.timings.stop == "interrupted":
            out.write(" [stopped]")
        out.write("\n")
        out.flush()


def _piped(chat: ChatSession, hide_thinking: bool = False) -> int:
    """One reply per message line on stdout; a reasoning model's thinking goes to
    stderr (a script reads the answers alone), unless hidden."""
    out = sys.stdout
    for raw in sys.stdin:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            msg = chat.command(line)   # errors end the script: exit 1 with the message
            if msg is None:
                return 0
            print(msg, file=sys.stderr, flush=True)
            continue
        write_reply(chat, line, out, sys.stderr, hide_thinking=hide_thinking)
        out.write("\n")
        out.flush()
    return 0


def cli_chat(args) -> int:
    name = args.model or DEFAULT_MODEL
    params = SamplerParams.from_args(args)
    model = load_model(name, n_ctx=args.ctx_size, precision=getattr(args, "precision", "fast"))
    from .constraint import from_args

    constraint = from_args(args, model.tokenizer)
    chat = ChatSession(model, system=args.system, params=params, n_predict=args.n_predict,
                       constraint=constraint, reasoning_format=getattr(args, "reasoning_format", "deepseek"),
                       think=getattr(args, "think", None))
    hide = bool(getattr(args, "hide_thinking", False))
    if sys.stdin.isatty():
        return _interactive(chat, name, hide_thinking=hide)
    return _piped(chat, hide_thinking=hide)
