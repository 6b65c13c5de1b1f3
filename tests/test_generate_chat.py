"""`generate` and `chat`: the conversation logic (KV-cache reuse, dropping old
turns, commands) on a scripted stand-in model with SmolLM2's real tokenizer
and chat template, then the real program end to end with SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.chat import ChatSession, _common_prefix
from runtime.cli import CLIError
from runtime.sampling import SamplerParams

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant."   # see shared/MODELS.md: SmolLM2 answers Paris with it


# ---------------------------------------------------------------- a scripted model

class _ScriptedSession:
    """A KV cache that records what it is fed; its 'logits' make greedy
    decoding spell the model's script and then end the turn."""

    def __init__(self, model):
        self.model = model
        self.tokens: list[int] = []
        self.evals: list[int] = []

    @property
    def n_past(self):
        return len(self.tokens)

    def eval(self, ids):
        ids = [int(i) for i in ids]
        assert ids, "eval of nothing"
        assert self.n_past + len(ids) <= self.model.n_ctx, "KV cache overflow"
        self.tokens.extend(ids)
        self.evals.append(len(ids))

    def logits(self):
        script = self.model.script
        last = self.tokens[-1]
        nxt = script[script.index(last) + 1] if last in script[:-1] else (
            self.model.eos if last == script[-1] else script[0])
        x = np.zeros(self.model.n_vocab, dtype=np.float32)
        x[nxt] = 10.0
        return x

    def rewind(self, n):  # the engine's meaning: drop the last n positions
        assert 0 <= n <= self.n_past
        del self.tokens[self.n_past - n:]

    def reset(self):
        self.tokens.clear()


class _ScriptedModel:
    def __init__(self, gguf, tokenizer, n_ctx, reply=" Paris is the capital."):
        self.gguf, self.tokenizer, self.n_ctx = gguf, tokenizer, n_ctx
        self.n_vocab = tokenizer.n_vocab
        self.script = tokenizer.tokenize(reply, add_special=False)
        assert len(set(self.script)) == len(self.script)
        self.eos = tokenizer.eos_id
        self.sessions = []

    def session(self):
        s = _ScriptedSession(self)
        self.sessions.append(s)
        return s


@pytest.fixture(scope="module")
def smol_vocab(smollm2_path):
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    g = GGUFFile(smollm2_path)
    return g, Tokenizer.from_gguf(g)


def _chat(smol_vocab, n_ctx=2048, **kw):
    g, tok = smol_vocab
    model = _ScriptedModel(g, tok, n_ctx)
    kw.setdefault("params", SamplerParams(temp=0))
    return ChatSession(model, **kw), model


def test_common_prefix():
    assert _common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert _common_prefix([], [1]) == 0
    assert _common_prefix([1, 2], [1, 2]) == 2


def test_turn_two_prefills_only_the_new_turn(smol_vocab):
    chat, model = _chat(smol_vocab, system=SYSTEM)
    tok = chat.tokenizer
    assert chat.say("What is the capital of France?") == " Paris is the capital."
    first = chat.render_ids(chat.messages[:1])
    assert chat.last_prefill == len(first)          # turn 1: the whole prompt
    cache_before = list(model.sessions[0].tokens)

    question = "And what is the capital of Germany, please?"
    chat.say(question)
    full = chat.render_ids(chat.messages[:3])
    new_text_tokens = len(tok.tokenize(question, add_special=False))
    # only the new user message, its template markers and the reply's last
    # token (sampled, never evaluated) are prefilled, not the conversation
    assert new_text_tokens <= chat.last_prefill <= new_text_tokens + 12
    assert chat.last_prefill < len(full) // 2
    s = model.sessions[0]
    assert len(model.sessions) == 1 and s.tokens[:len(cache_before)] == cache_before
    # what is cached is exactly the rendering of the conversation so far
    assert s.tokens[:len(full)] == full
    assert chat.n_evaluated == sum(s.evals)


def test_context_full_drops_oldest_turns_keeps_system(smol_vocab):
    notes = []
    chat, model = _chat(smol_vocab, n_ctx=160, system=SYSTEM, notify=notes.append)
    for i in range(8):
        chat.say(f"Tell me about the number {i} in one short sentence.")
    assert any("dropped" in n for n in notes)
    ids = chat.render_ids(chat.messages)
    assert len(ids) <= 160
    assert chat.tokenizer.detokenize(ids, special=True).startswith("<|im_start|>system\n" + SYSTEM)
    # the newest turn survives, the oldest does not
    assert chat.messages[-2]["content"].startswith("Tell me about the number 7")
    assert not any("number 0" in m["content"] for m in chat.messages)
    assert model.sessions[0].n_past <= 160


def test_message_longer_than_context_is_a_clear_error(smol_vocab):
    chat, _ = _chat(smol_vocab, n_ctx=64)
    with pytest.raises(CLIError, match="context holds 64"):
        chat.say("word " * 200)
    assert chat.messages == []          # nothing half-recorded
    assert chat.say("Hi") == " Paris is the capital."


def test_n_predict_and_stop(smol_vocab):
    chat, _ = _chat(smol_vocab, n_predict=2)
    out = chat.say("Hi")
    assert chat.timings.stop == "limit" and chat.timings.n_gen == 2
    assert out == chat.tokenizer.detokenize(chat.tokenizer.tokenize(" Paris is the capital.", add_special=False)[:2])
    chat.n_predict = -1
    gen = chat.reply("Again")
    first = next(gen)
    chat.stop()                          # what Ctrl-C does
    rest = "".join(gen)
    assert chat.timings.stop == "interrupted" and first + rest == chat.messages[-1]["content"]
    assert chat.timings.n_gen == 1


def test_commands(smol_vocab):
    chat, model = _chat(smol_vocab, system=SYSTEM)
    assert chat.command("/exit") is None
    assert "/reset" in chat.command("/help")
    assert chat.command("/set temp 0.7") == "temp = 0.7" and chat.sampler.params.temp == 0.7
    assert chat.command("/set top-k 5") == "top_k = 5" and chat.sampler.params.top_k == 5
    chat.command("/set seed 7")
    assert chat.sampler.params.seed == 7
    assert "min_p=0.05" in chat.command("/set")
    with pytest.raises(ValueError, match="unknown setting"):
        chat.command("/set tmp 1")
    with pytest.raises(ValueError):
        chat.command("/set top_p 2")
    with pytest.raises(ValueError, match="unknown command"):
        chat.command("/frobnicate")
    chat.command("/set temp 0")
    chat.say("Hi")
    st = chat.command("/stats")
    assert "tokens/s" in st and f"/{chat.n_ctx} tokens used" in st
    chat.command("/system You are a pirate.")
    assert chat.system == "You are a pirate."
    chat.say("Hi again")
    assert "You are a pirate." in chat.tokenizer.detokenize(model.sessions[0].tokens, special=True)
    chat.command("/reset")
    assert chat.messages == [] and model.sessions[0].n_past == 0


def test_piped_loop_prints_only_replies(smol_vocab, monkeypatch, capsys):
    import io

    import runtime.chat as chat_mod
    from runtime.cli import build_parser

    g, tok = smol_vocab
    monkeypatch.setattr(chat_mod, "load_model", lambda name, n_ctx=None, **kw: _ScriptedModel(g, tok, n_ctx or 512))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\n/set temp 0\nHow are you?\n/exit\nnot read\n"))
    args = build_parser().parse_args(["chat", "--temp", "0"])
    assert chat_mod.cli_chat(args) == 0
    out, err = capsys.readouterr()
    assert out == " Paris is the capital.\n" * 2
    assert "temp = 0" in err


# ---------------------------------------------------------------- the real program

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RUNTIME_DEBUG", None)
    return env


def test_real_model_turn_two_reuses_the_cache(smollm2_path):
    from runtime.model import Model

    model = Model.load(smollm2_path, n_ctx=256)
    chat = ChatSession(model, system=SYSTEM, params=SamplerParams(temp=0), n_predict=12)
    chat.say("What is the capital of France?")
    n1 = chat.n_evaluated
    first = chat.last_prefill
    question = "Thanks. And of Spain?"
    chat.say(question)
    full = chat.render_ids(chat.messages[:3])
    n_new = len(chat.tokenizer.tokenize(question, add_special=False))
    # the new message + template markers (+ the reply's last, never evaluated,
    # token): neither turn 1's prompt nor its reply is evaluated again
    assert n_new <= chat.last_prefill <= n_new + 12
    assert chat.last_prefill < len(full) - first
    assert chat.cached[:len(full)] == full and chat.session.n_past == len(chat.cached)
    assert chat.n_evaluated - n1 == chat.last_prefill + chat.timings.n_gen - (chat.timings.stop != "eog")
    # the reused cache gives the same next-token logits as evaluating it all afresh
    fresh = model.session()
    fresh.eval(full)
    chat.session.rewind(chat.session.n_past - len(full))
    a, b = chat.session.logits(), fresh.logits()
    assert int(np.argmax(a)) == int(np.argmax(b))
    np.testing.assert_allclose(a, b, atol=0.05 * float(np.abs(b).max()))


def test_chat_in_a_terminal(smollm2_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "runtime", "chat", str(smollm2_path), "--system", SYSTEM,
                                           "--temp", "0", "-c", "512", "-n", "48"],
                          cwd=str(ROOT), env=_env(), encoding="utf-8", timeout=120)
    try:
        child.expect_exact("> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("Paris")
        child.expect_exact("\r\n> ")
        child.sendline("What is its population?")
        child.expect_exact("\r\n> ")
        child.sendline("/stats")
        child.expect(r"context: \d+/512 tokens used")
        child.expect_exact("> ")
        # Ctrl-C stops a reply (here: after its first word) and returns to the prompt
        child.sendline("Write a long story about a dragon.")
        child.expect_exact("dragon.\r\n")
        child.expect(r"\w+")
        child.sendintr()
        child.expect_exact(" [stopped]\r\n> ")
        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_chat_piped_stdin(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "chat", str(smollm2_path), "--system", SYSTEM,
                        "--temp", "0", "-c", "512", "-n", "24"],
                       input="What is the capital of France?\n/set seed 3\nThank you!\n",
                       capture_output=True, text=True, cwd=str(ROOT), env=_env(), timeout=180)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout                  # one reply per message, nothing else
    assert "Paris" in lines[0]
    assert ">" not in r.stdout[:1]


def test_generate_streams_and_reports_speed(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "generate", str(smollm2_path),
                        "-p", "The capital of France is", "-n", "8", "--temp", "0"],
                       capture_output=True, text=True, cwd=str(ROOT), env=_env(), timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is")
    assert len(r.stdout) > len("The capital of France is") + 2
    assert "prompt eval time" in r.stderr and "tokens per second" in r.stderr
    import re

    n_gen = int(re.search(r"eval time =.*?/\s*(\d+) tokens", r.stderr.splitlines()[-1]).group(1))
    assert 1 <= n_gen <= 8


def test_generate_prompt_longer_than_context(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "generate", str(smollm2_path),
                        "-p", "word " * 100, "-c", "32"],
                       capture_output=True, text=True, cwd=str(ROOT), env=_env(), timeout=180)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: the prompt has") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- reasoning models

R1_TEMPLATE = (ROOT / "tests" / "data" / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text(encoding="utf-8")
R1_SCRIPT = ["Okay,", " the user asks about France.", "</think>", "\n\n", "The capital", " is Paris."]
R1_THINKING, R1_ANSWER = "Okay, the user asks about France.", "The capital is Paris."


@pytest.fixture(scope="module")
def r1_path(tmp_path_factory):
    """A model written for the test (tests/_scripted_gguf.py) with llama.cpp's copy of
    the DeepSeek-R1-Distill template: the generation prompt opens <think>, so the reply
    starts inside it; </think> is one token here."""
    from _scripted_gguf import write_scripted

    return write_scripted(tmp_path_factory.mktemp("r1") / "r1-thinker.gguf", R1_SCRIPT,
                          chat_template=R1_TEMPLATE, eos="<｜end▁of▁sentence｜>")


@pytest.fixture(scope="module")
def r1_model(r1_path):
    from runtime.model import Model

    return Model.load(r1_path, n_ctx=256)


def test_chat_tells_thinking_from_the_answer_and_drops_it_from_history(r1_model):
    from runtime.chat import _common_prefix

    chat = ChatSession(r1_model, system=SYSTEM, params=SamplerParams(temp=0))
    parts = list(chat.reply_parts("What is the capital of France?"))
    assert chat.prompt_text.endswith("<｜Assistant｜><think>\n")
    assert "".join(t for k, t in parts if k == "thinking") == R1_THINKING
    assert "".join(t for k, t in parts if k == "answer") == R1_ANSWER
    assert [k for k, _ in parts] == sorted((k for k, _ in parts), reverse=True)   # thinking, then answer
    # the reply is kept whole; the template drops its thinking from the next prompt,
    # and only what differs from the cache from there on is evaluated again
    assert chat.messages[-1]["content"] == "".join(R1_SCRIPT)
    ids1, cached = chat.render_ids(chat.messages[:1]), list(chat.cached)
    assert cached[:len(ids1)] == ids1
    chat.say("And of Spain?")
    ids2, text2 = chat.render(chat.messages[:3])
    assert "user asks" not in text2 and "<｜Assistant｜>\n\nThe capital is Paris.<｜end▁of▁sentence｜>" in text2
    keep = _common_prefix(ids2, cached)
    assert keep == len(ids1) - 2       # up to turn 1's <｜Assistant｜>, before its <think>\n
    assert chat.last_prefill == len(ids2) - keep
    assert chat.cached[:len(ids2)] == ids2


def test_chat_display_dimmed_hidden_or_raw(r1_model):
    import io

    from runtime.chat import DIM, UNDIM, write_reply

    def show(**kw):
        fmt = kw.pop("reasoning_format", "deepseek")
        chat = ChatSession(r1_model, params=SamplerParams(temp=0), reasoning_format=fmt)
        out, err = io.StringIO(), io.StringIO()
        write_reply(chat, "Hi", out, kw.pop("to", None) and err, **kw)
        return out.getvalue(), err.getvalue()

    assert show(dim=True) == (DIM + R1_THINKING + UNDIM + "\n" + R1_ANSWER, "")
    assert show(hide_thinking=True) == (R1_ANSWER, "")
    assert show(to=True) == (R1_ANSWER, R1_THINKING + "\n")          # piped: thinking on stderr
    assert show(reasoning_format="none") == ("".join(R1_SCRIPT), "")


def test_think_flags_reach_the_template(smol_vocab):
    """--think / --no-think are Qwen3's enable_thinking; absent, the template's default."""
    from runtime.cli import build_parser
    from test_chat_template import QWEN3

    p = build_parser()
    assert p.parse_args(["chat"]).think is None
    assert p.parse_args(["chat", "--think"]).think is True
    assert p.parse_args(["chat", "--no-think"]).think is False
    a = p.parse_args(["chat", "--hide-thinking", "--reasoning-format", "none"])
    assert a.hide_thinking and a.reasoning_format == "none"
    with pytest.raises(SystemExit):
        p.parse_args(["chat", "--think", "--no-think"])
    g, tok = smol_vocab

    class Qwen3Like(_ScriptedModel):
        def __init__(self):
            super().__init__(g, tok, 512)
            self.gguf = {"tokenizer.chat_template": QWEN3}

    turn = [{"role": "user", "content": "Hi"}]
    texts = {think: ChatSession(Qwen3Like(), think=think).render(turn)[1] for think in (None, True, False)}
    assert texts[None] == texts[True] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert texts[False] == texts[True] + "<think>\n\n</think>\n\n"


def test_chat_cli_piped_thinking_on_stderr(r1_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "chat", str(r1_path), "--temp", "0", "-c", "256"],
                       input="What is the capital of France?\n", capture_output=True, text=True,
                       cwd=str(ROOT), env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == R1_ANSWER + "\n"
    assert R1_THINKING in r.stderr and "\x1b[" not in r.stderr
