"""``python -m runtime serve``: the real server (a subprocess on a free loopback port)
driven by the official ``openai`` client and by raw HTTP (httpx).

Every expected value is computed here, not written down: greedy text from the
runtime's own generate path, token counts from our tokenizer, logprobs from the
model's logits, stop strings cut out of an unconstrained reply."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _browser import browser_fixture  # noqa: E402 - after the importorskips
from _http_util import serve_url, spawn_serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_PARALLEL = 8
N_CTX_TOTAL = 2048          # 256 tokens per slot
N_CTX_SLOT = N_CTX_TOTAL // N_PARALLEL
SYSTEM = "You are a helpful assistant."
STARTUP_S = 900             # a fresh numba cache (any runtime/*.py edit) compiles for minutes on 2 cores


class Server:
    """A ``serve`` subprocess.  Construction only starts it; ``ready()`` waits until it
    listens, is healthy and has run one tiny request (``url`` is set then), so that
    several servers can boot at once (see the ``servers`` fixture)."""

    def __init__(self, model_path, *flags):
        self.key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else None
        self.proc = spawn_serve(model_path, "-t", "1", *flags, stderr=subprocess.PIPE)
        self.stderr: list[str] = []
        self.url = None
        self._error: str | None = None
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self._boot = threading.Thread(target=self._start, daemon=True)
        self._boot.start()

    def _start(self):
        try:
            self.url = serve_url(self.proc)
            # one tiny request compiles (or loads) the prefill and decode kernels, so that
            # the tests' own timeouts measure serving, not numba
            r = httpx.post(self.url + "/v1/completions", timeout=STARTUP_S, headers=self.auth(),
                           json={"prompt": "Hello there", "max_tokens": 2, "ignore_eos": True})
            if r.status_code != 200:
                raise RuntimeError(f"the first request failed: {r.status_code} {r.text}")
        except Exception as e:  # noqa: BLE001 - reported by ready()
            self._error = f"{e} {''.join(self.stderr)[-2000:]}"

    def ready(self) -> "Server":
        self._boot.join(STARTUP_S)
        if self._boot.is_alive() or self._error:
            self.stop()
            raise RuntimeError(self._error or f"server not ready after {STARTUP_S} s")
        return self

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=STARTUP_S, max_retries=0)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


QWEN3_SCRIPT = ["<think>", "\nThe user wants the capital.", "\n</", "think", ">", "\n\nParis", " is the capital."]


@pytest.fixture(scope="module")
def servers(request, smollm2_path, tmp_path_factory):
    """Every server that this module's selected tests use, started at once: booting
    (imports, model load, kernels from numba's cache) is most of a server's cost and
    mostly one core's work, so they overlap instead of queueing.

    * server: SmolLM2 on 8 slots of 256 tokens;
    * small_server: one slot, a queue of one, an API key (401, 503, the freed slot, SIGTERM);
    * qwen3_thinker: a model written for the test (tests/_scripted_gguf.py) with the
      official Qwen3 template, whose greedy reply thinks and then answers, with
      </think> split over three tokens; one slot, llama-server's prefix cache reuse."""
    used = {name for item in request.session.items if getattr(item, "module", None) is request.module
            for name in item.fixturenames}
    out: dict = {}
    if "server" in used:
        out["server"] = Server(smollm2_path, "-np", str(N_PARALLEL), "-c", str(N_CTX_TOTAL))
    if "small_server" in used:
        out["small_server"] = Server(smollm2_path, "-np", "1", "-c", "256", "--max-queue", "1",
                                     "--api-key", "sesame")
    if "qwen3_thinker" in used:
        from _scripted_gguf import write_scripted
        from test_chat_template import QWEN3

        path = write_scripted(tmp_path_factory.mktemp("thinker") / "qwen3-thinker.gguf", QWEN3_SCRIPT,
                              chat_template=QWEN3)
        out["qwen3_thinker"] = Server(path, "-np", "1", "-c", "512", "--cache-reuse", "prefix")
        out["qwen3_thinker_path"] = path
    yield out
    for s in out.values():
        if isinstance(s, Server):
            s.stop()


@pytest.fixture(scope="module")
def model(smollm2_path, servers):
    """SmolLM2 in this process, loaded (and its kernels loaded from numba's cache) while
    the servers boot."""
    from runtime.model import Model

    m = Model.load(smollm2_path, n_ctx=N_CTX_SLOT)
    m.session(8).eval([1])
    return m


@pytest.fixture(scope="module")
def server(servers, model):
    return servers["server"].ready()


@pytest.fixture(scope="module")
def small_server(servers):
    return servers["small_server"].ready()


@pytest.fixture(scope="module")
def qwen3_thinker(servers):
    return servers["qwen3_thinker"].ready(), servers["qwen3_thinker_path"]


def chat_ids(model, messages) -> list[int]:
    """The prompt tokens the server should build: the GGUF's template, our tokenizer."""
    from runtime.chat_template import render_chat

    tok = model.tokenizer
    text = render_chat(model.gguf.get("tokenizer.chat_template"), messages, add_generation_prompt=True,
                       bos_token=tok.token_to_piece(tok.bos_id, True).decode() if tok.bos_id is not None else "",
                       eos_token=tok.token_to_piece(tok.eos_id, True).decode() if tok.eos_id is not None else "")
    return tok.tokenize(text, add_special=True, parse_special=True)


def greedy_generate(model, ids, n) -> str:
    """The runtime's own generate path (runtime.generate.stream_reply), greedy."""
    from runtime.generate import stream_reply
    from runtime.sampling import Sampler, SamplerParams

    s = model.session()
    s.eval(ids)
    return "".join(stream_reply(s, model.tokenizer, Sampler(SamplerParams(temp=0)), n_predict=n,
                                n_ctx=s.n_ctx, history=list(ids)))


def capital_messages():
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]


def post(server, path, body=None, *, content=None, headers=None, timeout=120):
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content if content is not None else json.dumps(body),
                      headers=h, timeout=timeout)


def assert_error(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])
    return err


def sse_events(resp) -> list:
    """data: payloads of an SSE response, [DONE] as the string."""
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---------------------------------------------------------------- chat

def test_chat_plain_and_streamed(server, model):
    c = server.client()
    msgs = capital_messages()
    r = c.chat.completions.create(model="smollm", messages=msgs, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(chat_ids(model, msgs))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the reply's tokens: it ended on EOS, so re-tokenizing the text gives its tokens back
    assert r.usage.completion_tokens == len(model.tokenize(text, add_special=False))

    chunks = list(c.chat.completions.create(model="smollm", messages=msgs, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the repeated prompt came from the slot's cache (its kept logits), with the same reply
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])

    # the wire format itself: SSE, ending with data: [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json={"messages": msgs, "temperature": 0, "max_tokens": 4, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_list_of_text_parts_and_default_system(server, model):
    c = server.client()
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    r = c.chat.completions.create(model="m", messages=[{"role": "system", "content": SYSTEM},
                                                       {"role": "user", "content": parts}],
                                  temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens == len(chat_ids(model, capital_messages()))
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert_error(r, 400, "not supported")


# ---------------------------------------------------------------- engine equality

def test_greedy_equals_generate_path(server, model):
    """/v1/completions with a string and with a token list give generate's greedy text."""
    prompt = "The three primary colors are"
    n = 12
    ids = model.tokenize(prompt, add_special=True, parse_special=True)
    expected = greedy_generate(model, ids, n)
    c = server.client()
    for p in (prompt, ids):
        r = c.completions.create(model="m", prompt=p, temperature=0, max_tokens=n, extra_body={"cache_prompt": False})
        assert r.choices[0].text == expected
        assert r.usage.prompt_tokens == len(ids)
        assert r.object == "text_completion"


def test_concurrent_streams_equal_sequential(server, model):
    """Batch invariance: eight greedy streams at once (one per slot) give each one's solo
    text, and they really shared decode steps (the metrics' rows per step)."""
    prompts = ["Once upon a time", "The best way to learn Python is", "def fibonacci(n):",
               "Water boils at a temperature of", "My favourite fruit is", "import numpy as np",
               "The sky is blue because", "Dear Sir or Madam,"]
    assert len(prompts) == N_PARALLEL
    n = 8
    c = server.client()

    def run(p, out, i):
        chunks = c.completions.create(model="m", prompt=p, temperature=0, max_tokens=n, stream=True,
                                      extra_body={"cache_prompt": False, "ignore_eos": True})
        out[i] = "".join(ch.choices[0].text for ch in chunks if ch.choices)

    solo = {}
    for i, p in enumerate(prompts):
        run(p, solo, i)
    before = metrics(server)
    together = {}
    threads = [threading.Thread(target=run, args=(p, together, i)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    after = metrics(server)
    assert together == solo
    steps = after["decode_steps_total"] - before["decode_steps_total"]
    rows = after["generated_tokens_total"] - before["generated_tokens_total"]
    assert rows == len(prompts) * n
    assert steps < rows - n, f"{rows} tokens in {steps} decode steps: the streams were not batched"


# ---------------------------------------------------------------- stops, lengths, logprobs

def test_stop_strings_are_never_emitted(server):
    c = server.client()
    prompt = "The capital of France is Paris. The capital of Germany is"
    full = c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16,
                                extra_body={"ignore_eos": True}).choices[0].text
    words = [w for w in full.split() if len(w) >= 3]
    assert words, full
    stop = words[len(words) // 2]
    cut = full.index(stop)
    r = c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16, stop=[stop, "\u2603"],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True}))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == full[:cut] and stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(server):
    c = server.client()
    for field in ("max_tokens", "max_completion_tokens"):
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Count to fifty."}],
                                      temperature=0, extra_body={"ignore_eos": True}, **{field: 3})
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 3


def test_logprobs_are_log_softmax(server, model):
    from runtime.scheduler import log_softmax

    c = server.client()
    msgs = capital_messages()
    r = c.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=5,
                                  logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert sum(math.exp(lp) for lp in lps) <= 1 + 1e-6
        assert e.logprob == pytest.approx(lps[0])       # greedy took the most likely
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    # the first token's value is the model's log-softmax at the end of the prompt
    s = model.session()
    s.eval(chat_ids(model, msgs))
    ls = log_softmax(s.logits())
    assert content[0].logprob == pytest.approx(float(ls.max()), abs=1e-4)
    assert math.log(sum(math.exp(v) for v in ls)) == pytest.approx(0, abs=1e-6)

    r = c.completions.create(model="m", prompt="Hello, my name is", temperature=0, max_tokens=4, logprobs=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)


# ---------------------------------------------------------------- the other routes

def metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            out[name.removeprefix("gguf_runtime_")] = float(value)
    return out


def test_models_health_tokenize_metrics(server, model):
    c = server.client()
    ms = c.models.list().data
    assert len(ms) == 1 and ms[0].id == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert c.models.retrieve(ms[0].id).id == ms[0].id
    h = httpx.get(server.url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"

    text = "Hello world, <|im_start|> héllo"
    r = post(server, "/tokenize", {"content": text})
    assert r.json()["tokens"] == model.tokenize(text, add_special=False, parse_special=True)
    r = post(server, "/tokenize", {"content": text, "with_pieces": True, "add_special": True})
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == model.tokenize(text, add_special=True, parse_special=True)
    assert "".join(p["piece"] for p in pieces if isinstance(p["piece"], str)).endswith("héllo")
    r = post(server, "/detokenize", {"tokens": model.tokenize("A round trip.", add_special=False)})
    assert r.json() == {"content": "A round trip."}

    before = metrics(server)
    c.completions.create(model="m", prompt="Hi", max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    after = metrics(server)
    assert after["requests_total"] == before["requests_total"] + 1
    assert after["generated_tokens_total"] == before["generated_tokens_total"] + 2
    assert after["kv_cells_total"] == N_CTX_TOTAL
    assert 0 < after["kv_cells_used"] <= N_CTX_TOTAL
    assert after["requests_active"] == 0 and after["requests_waiting"] == 0
    raw = httpx.get(server.url + "/metrics", timeout=30).text
    assert "# TYPE gguf_runtime_generated_tokens_total counter" in raw


# ---------------------------------------------------------------- the web chat page

browser = pytest.fixture(scope="module")(browser_fixture)


def _page_state(browser, s, until, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        st = browser.eval(s, "chatPage.state()")
        if until(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def _type_and_send(browser, s, text):
    browser.eval(s, f"document.getElementById('input').value = {json.dumps(text)}; "
                    "document.getElementById('send').click(); true")


def test_web_chat_page(server, model, browser):
    """The page at / in headless Chromium: no console errors, a question gets a streamed
    reply with Paris (SmolLM2 with a system prompt, greedy), the next turn carries the
    conversation, and Stop ends a reply (the server frees the slot)."""
    r = httpx.get(server.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text), "the page must not load anything"
    browser.events.clear()
    s = browser.open(server.url + "/")
    assert browser.errors() == []
    assert _page_state(browser, s, lambda st: True)["bubbles"] == 0
    browser.eval(s, f"document.getElementById('system').value = {json.dumps(SYSTEM)}; "
                    "document.getElementById('temperature').value = '0'; "
                    "document.getElementById('max_tokens').value = '24'; true")
    question = capital_messages()[1]["content"]
    _type_and_send(browser, s, question)
    st = _page_state(browser, s, lambda st: not st["busy"] and len(st["messages"]) == 2)
    reply = st["messages"][1]["content"]
    assert "Paris" in reply and st["error"] == ""
    assert st["chunks"] > 1, "the reply came in one piece, not streamed"
    # what the page shows is what the API answers
    api = server.client().chat.completions.create(model="m", messages=capital_messages(), temperature=0,
                                                  max_tokens=24)
    assert reply == api.choices[0].message.content
    assert browser.eval(s, "document.querySelectorAll('.msg.assistant .content')[0].textContent") == reply

    # turn two: the whole conversation goes with it (the server prefills all of it)
    before = metrics(server)
    _type_and_send(browser, s, "And of Germany?")
    st = _page_state(browser, s, lambda st: not st["busy"] and len(st["messages"]) == 4)
    assert st["messages"][3]["content"] and st["error"] == ""
    sent = capital_messages() + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Germany?"}]
    after = metrics(server)
    n_prompt = len(chat_ids(model, sent))
    assert (after["prompt_tokens_total"] + after["prompt_tokens_cached_total"]
            - before["prompt_tokens_total"] - before["prompt_tokens_cached_total"]) == n_prompt

    # Stop: a long reply, stopped after a few chunks, stays in the conversation
    browser.eval(s, "document.getElementById('max_tokens').value = ''; true")
    _type_and_send(browser, s, "Write a long story about a dragon.")
    _page_state(browser, s, lambda st: st["busy"] and st["chunks"] >= 3)
    browser.eval(s, "document.getElementById('stop').click(); true")
    st = _page_state(browser, s, lambda st: not st["busy"], timeout=30)
    assert st["status"] == "stopped" and len(st["messages"]) == 6 and st["messages"][5]["content"]
    assert "[stopped]" in browser.eval(s, "document.querySelectorAll('.msg.assistant')[2].textContent")
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health", timeout=30).json()["slots_processing"]:
        assert time.monotonic() < deadline, "the stopped reply still holds its slot"
        time.sleep(0.1)
    assert browser.errors() == []


# ---------------------------------------------------------------- load

def test_64_requests_from_16_threads(server):
    """Nothing lost, every response well formed: chat and completions, streamed and not,
    16 threads at once on 8 slots (so requests queue)."""
    before = metrics(server)
    prompts = ["Hi", "Tell me a joke", "Name a color", "Count to three"]
    system = {"role": "system", "content": "Be brief."}   # SmolLM2's default one is 30 tokens
    results, errors = [], []

    def chat(i, stream):
        body = {"messages": [system, {"role": "user", "content": prompts[i % 4]}], "max_tokens": 3,
                "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": stream}
        if not stream:
            r = post(server, "/v1/chat/completions", body, timeout=600)
            assert r.status_code == 200, r.text
            j = r.json()
            assert j["object"] == "chat.completion" and j["id"].startswith("chatcmpl-")
            ch = j["choices"][0]
            assert ch["finish_reason"] == "length" and isinstance(ch["message"]["content"], str)
            assert j["usage"]["completion_tokens"] == 3
            return
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream_options": {
                "include_usage": True}}, timeout=600) as resp:
            assert resp.status_code == 200
            ev = sse_events(resp)
        assert ev[-1] == "[DONE]" and len({e["id"] for e in ev[:-1]}) == 1
        assert [e["choices"][0]["finish_reason"] for e in ev[:-2]].count("length") == 1
        assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 3

    def completion(i, stream):
        body = {"prompt": prompts[i % 4], "max_tokens": 3, "temperature": 0.7, "seed": i, "ignore_eos": True,
                "stream": stream}
        if not stream:
            r = post(server, "/v1/completions", body, timeout=600)
            assert r.status_code == 200, r.text
            j = r.json()
            assert j["object"] == "text_completion" and j["choices"][0]["finish_reason"] == "length"
            assert j["usage"]["completion_tokens"] == 3
            return
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=600) as resp:
            assert resp.status_code == 200
            ev = sse_events(resp)
        assert ev[-1] == "[DONE]" and ev[-2]["choices"][0]["finish_reason"] == "length"
        assert all(e["object"] == "text_completion" for e in ev[:-1])

    def worker(t):
        for k in range(4):
            i = 4 * t + k
            try:
                (chat if i % 2 else completion)(i, stream=bool(i // 2 % 2))
                results.append(i)
            except Exception as e:  # noqa: BLE001 - reported below with its request
                errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert errors == []
    assert sorted(results) == list(range(64))
    after = metrics(server)
    assert after["requests_total"] - before["requests_total"] == 64
    assert after["requests_finished_total"] - before["requests_finished_total"] == 64
    assert after["generated_tokens_total"] - before["generated_tokens_total"] == 64 * 3
    assert after["requests_active"] == 0 and after["requests_waiting"] == 0


# ---------------------------------------------------------------- bad input

def test_bad_requests_get_openai_errors(server):
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    assert_error(post(server, chat, {"messages": msgs, "temperature": "hot"}), 400, "temperature")
    assert_error(post(server, chat, {"messages": msgs, "temprature": 0.5}), 400, "temprature", "unknown")
    assert_error(post(server, chat, {"messages": msgs, "max_tokens": -5}), 400, "max_tokens")
    assert_error(post(server, chat, content=b'{"messages": [{"role": "user", "content": "hi"}], '
                                            b'"temperature": NaN}'), 400, "temperature")
    assert_error(post(server, chat, {"messages": []}), 400, "messages")
    assert_error(post(server, chat, content=b"{not json"), 400, "json")
    assert_error(post(server, chat, {"messages": msgs, "n": 2}), 400, "n")
    assert_error(post(server, chat, {"messages": [{"role": "wizard", "content": "hi"}]}), 400, "role")
    assert_error(post(server, chat, {"messages": msgs, "top_logprobs": 2}), 400, "logprobs")
    assert_error(post(server, chat, {"messages": msgs, "stop": [""]}), 400, "stop")
    assert_error(post(server, chat, {"messages": msgs, "logit_bias": {"99999999": 1}}), 400, "logit_bias")
    assert_error(post(server, "/v1/completions", {"prompt": [10 ** 7]}), 400, "token id")
    assert_error(post(server, "/detokenize", {"tokens": [-1]}), 400, "token id")
    assert_error(post(server, "/v1/completions", {"prompt": ["a", "b"]}), 400, "one prompt")

    # a prompt longer than a slot: the message gives its token count and the limit
    long = " ".join(["word"] * (N_CTX_SLOT + 20))
    err = assert_error(post(server, "/v1/completions", {"prompt": long, "max_tokens": 1}), 400, "tokens",
                       str(N_CTX_SLOT))
    assert err["code"] == "context_length_exceeded"
    assert str(len(
        httpx.post(server.url + "/tokenize", json={"content": long, "add_special": True}).json()["tokens"]
    )) in err["message"]
    assert_error(post(server, chat, {"messages": [{"role": "user", "content": long}]}), 400, str(N_CTX_SLOT))

    err = assert_error(httpx.get(server.url + "/v1/nothing-here", timeout=30), 404, "unknown route")
    assert err["type"] == "not_found_error"
    assert_error(post(server, chat, content=b"x" * (8 * 1024 * 1024 + 1)), 413, "limit")
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="m", messages=msgs, temperature=-1)
    # and it keeps serving
    r = server.client().chat.completions.create(model="m", messages=msgs, max_tokens=2, temperature=0)
    assert r.choices[0].message.content is not None


def test_response_format(server):
    """response_format goes through runtime.constraint when it is installed; either a
    valid JSON reply or a 400 that says why, never a 500."""
    msgs = [{"role": "user", "content": "Give me a JSON object with a name."}]
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 48, "temperature": 0,
                                              "response_format": {"type": "json_schema", "json_schema": {
                                                  "name": "bad", "schema": {"type": "no-such-type"}}}})
    assert_error(r, 400, "response_format")
    try:
        import llguidance  # noqa: F401
        from runtime.constraint import Constraint  # noqa: F401
    except ImportError:
        r = post(server, "/v1/chat/completions", {"messages": msgs, "response_format": {"type": "json_object"}})
        assert_error(r, 400, "response_format")
        return
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
              "required": ["name"], "additionalProperties": False}
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 48, "temperature": 0,
                                              "response_format": {"type": "json_schema", "json_schema": {
                                                  "name": "person", "schema": schema}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    obj = json.loads(choice["message"]["content"])
    assert set(obj) == {"name"} and isinstance(obj["name"], str)


# ---------------------------------------------------------------- key, queue, disconnect, SIGTERM

def test_api_key(small_server):
    r = httpx.get(small_server.url + "/v1/models", timeout=30)
    assert_error(r, 401, "api key")
    r = httpx.get(small_server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert_error(r, 401, "invalid")
    assert httpx.get(small_server.url + "/health", timeout=30).status_code == 200   # public
    with pytest.raises(openai.AuthenticationError):
        small_server.client("wrong").models.list()
    assert small_server.client("sesame").models.list().data[0].id


def _open_stream(server, key, max_tokens=400):
    """A long streamed request holding the slot: (client, response, iterator)."""
    client = httpx.Client(timeout=120)
    req = client.build_request("POST", server.url + "/v1/completions",
                               headers={"Authorization": f"Bearer {key}"},
                               json={"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
                                     "ignore_eos": True, "temperature": 0})
    resp = client.send(req, stream=True)
    assert resp.status_code == 200
    it = resp.iter_lines()
    got = 0
    for line in it:
        if line.startswith("data: ") and '"text"' in line:
            got += 1
            if got >= 3:
                break
    return client, resp, it


def test_queue_full_503_and_disconnect_frees_slot(small_server):
    key = "sesame"
    auth = {"Authorization": f"Bearer {key}"}
    client, resp, _ = _open_stream(small_server, key)
    # the slot is busy: one request may wait, the next is refused
    waiting = {}

    def wait_one():
        waiting["r"] = post(small_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0},
                            headers=auth, timeout=300)

    t = threading.Thread(target=wait_one)
    t.start()
    deadline = time.monotonic() + 60
    while httpx.get(small_server.url + "/health", timeout=30).json()["requests_waiting"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.1)
    r = post(small_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers=auth)
    err = assert_error(r, 503, "busy")
    assert err["code"] == "queue_full"
    # the streaming client goes away: its slot serves the waiting request at once
    resp.close()
    client.close()
    t.join(120)
    assert waiting["r"].status_code == 200, waiting["r"].text
    assert waiting["r"].json()["usage"]["completion_tokens"] >= 1
    # the abandoned stream was cut short, not run to its 400 tokens (it was cancelled
    # before the waiting request got its slot)
    m = httpx.get(small_server.url + "/metrics", headers=auth, timeout=30).text
    gen = float(next(l.split()[1] for l in m.splitlines() if l.startswith("gguf_runtime_generated_tokens_total")))
    assert gen < 200, gen


def test_sigterm_ends_streams_and_exits_0(small_server):
    """SIGTERM: the open stream gets its final chunk and [DONE] at the next step (not
    after running to its 2000 tokens or its 256-token context), every slot is freed
    (a slot still running would hold the process in uvicorn's wait for connections),
    and the process exits with status 0 within 5 s of the signal (issue #18)."""
    client, resp, it = _open_stream(small_server, "sesame", max_tokens=2000)
    t0 = time.monotonic()
    small_server.proc.send_signal(signal.SIGTERM)
    rest = [l for l in it if l.startswith("data: ")]
    t_final = time.monotonic() - t0
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] == "length"
    n_text = sum('"text"' in l for l in rest)
    assert n_text < 200, f"{n_text} more tokens after SIGTERM: the stream ran to its context"
    assert small_server.proc.wait(30) == 0
    t_exit = time.monotonic() - t0
    # the streams' end is the scheduler's next step; the exit after it is uvicorn's
    # shutdown and the engine thread's join (serve skips the interpreter's teardown,
    # which took seconds on a loaded machine): both within the 5 s
    assert t_final < 5, t_final
    assert t_exit < 5, t_exit
    assert "Traceback" not in "".join(small_server.stderr)
    client.close()


# ---------------------------------------------------------------- reasoning split

def _split(pieces, thinking=False):
    from runtime.server import ReasoningSplitter

    r = ReasoningSplitter(thinking)
    out = [r.feed(p) for p in pieces] + [r.flush()]
    return "".join(t for t, _ in out), "".join(c for _, c in out)


@pytest.mark.parametrize("cut", range(1, 24))
def test_reasoning_split_at_any_cut(cut):
    """<think> ... </think> goes to reasoning_content wherever the stream splits it,
    tags included; the answer keeps no leading blank lines."""
    text = "<think>Paris is in France.</think>\n\nParis."
    assert _split([text[:cut], text[cut:]]) == ("Paris is in France.", "Paris.")
    assert _split(list(text)) == ("Paris is in France.", "Paris.")


def test_reasoning_split_edge_cases():
    # the template opened <think> (DeepSeek-R1 distills): the reply starts inside it
    assert _split(["I should ", "answer.</th", "ink>Yes."], thinking=True) == ("I should answer.", "Yes.")
    # a model without thinking: nothing held back for good, '<' at the start included
    assert _split(["<b>bold</b> text"]) == ("", "<b>bold</b> text")
    assert _split(["  <", "thin"]) == ("", "  <thin")
    # <think> only opens a block at the start of the reply
    assert _split(["Answer: <think>x</think>"]) == ("", "Answer: <think>x</think>")
    # cut off while thinking: what there is, is reasoning
    assert _split(["<think>unfinished"]) == ("unfinished", "")


# ---------------------------------------------------------------- a reasoning model, end to end

def test_reasoning_model_through_the_server(qwen3_thinker):
    from runtime.chat import render_prompt
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    server, path = qwen3_thinker
    g = GGUFFile(path)
    tok, template = Tokenizer.from_gguf(g), g.get("tokenizer.chat_template")
    raw = "".join(QWEN3_SCRIPT)
    q1 = [{"role": "user", "content": "What is the capital of France?"}]
    c = server.client()
    r = c.chat.completions.create(model="m", messages=q1, temperature=0)
    msg = r.choices[0].message
    assert msg.content == "Paris is the capital."
    assert msg.model_extra["reasoning_content"].strip() == "The user wants the capital."
    assert r.usage.completion_tokens == len(QWEN3_SCRIPT)
    ids1, text1 = render_prompt(tok, template, q1)
    assert r.usage.prompt_tokens == len(ids1) and text1.endswith("<|im_start|>assistant\n")

    # streamed: no piece of a tag ever reaches the content, wherever the tokens cut it
    chunks = list(c.chat.completions.create(model="m", messages=q1, temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    content = [d.content for d in deltas if d.content]
    thinking = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert "".join(content) == "Paris is the capital." and not any("<" in p or ">" in p for p in content)
    assert thinking.strip() == "The user wants the capital."

    # reasoning_format none: the reply as the model wrote it
    r = post(server, "/v1/chat/completions", {"messages": q1, "temperature": 0, "reasoning_format": "none"})
    m = r.json()["choices"][0]["message"]
    assert m["content"] == raw and "reasoning_content" not in m

    # chat_template_kwargs reach the template: Qwen3's enable_thinking=false prompt
    r = c.chat.completions.create(model="m", messages=q1, temperature=0, max_tokens=2,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    ids_off, text_off = render_prompt(tok, template, q1, enable_thinking=False)
    assert text_off.endswith("<think>\n\n</think>\n\n") and r.usage.prompt_tokens == len(ids_off) > len(ids1)

    # the follow-up turn: the client sends the answer back, the template renders the
    # earlier turn without its thinking, so the slot's cache (prompt + whole reply)
    # matches the new prompt up to the end of turn 1's prompt: that is reused
    c.chat.completions.create(model="m", messages=q1, temperature=0)   # the slot holds turn 1 again
    q2 = q1 + [{"role": "assistant", "content": "Paris is the capital."},
               {"role": "user", "content": "And of Spain?"}]
    ids2, text2 = render_prompt(tok, template, q2)
    assert "The user wants" not in text2
    r = c.chat.completions.create(model="m", messages=q2, temperature=0)
    assert r.usage.prompt_tokens == len(ids2)
    assert r.usage.prompt_tokens_details.cached_tokens == len(ids1)
    assert r.choices[0].message.content == "Paris is the capital."


# ---------------------------------------------------------------- the prompt cache (in-process scheduler)

def _run_scheduler(sched, prompt, n=2):
    from runtime.sampling import SamplerParams
    from runtime.scheduler import Delta, Failed, Finished, GenerationRequest

    done = threading.Event()
    out = {"text": ""}

    def sink(ev):
        if isinstance(ev, Delta):
            out["text"] += ev.text
        elif isinstance(ev, (Finished, Failed)):
            out["end"] = ev
            done.set()

    sched.submit(GenerationRequest(prompt=prompt, params=SamplerParams(temp=0), max_tokens=n,
                                   ignore_eos=True), sink)
    assert done.wait(STARTUP_S)
    assert isinstance(out["end"], Finished), out["end"]
    return out["text"], out["end"]


@pytest.mark.parametrize("policy", ["exact", "prefix", "off"])
def test_prompt_cache_policies(model, policy):
    """exact: a repeated prompt is served from its kept logits (nothing prefilled, same
    text); a longer prompt sharing less than a whole 256-token chunk prefills from 0.
    prefix: llama-server's longest common prefix.  off: never."""
    from runtime.scheduler import Scheduler

    sched = Scheduler(model, 2, N_CTX_SLOT, cache_reuse=policy).start()
    try:
        a = model.tokenize("The quick brown fox jumps over the lazy dog.", add_special=True)
        text1, f1 = _run_scheduler(sched, a)
        assert f1.n_cached == 0
        text2, f2 = _run_scheduler(sched, a)
        assert text2 == text1
        assert f2.n_cached == {"exact": len(a), "prefix": len(a) - 1, "off": 0}[policy]
        longer = a + model.tokenize(" Zebra crossings glow softly.", add_special=False)
        _, f3 = _run_scheduler(sched, longer)
        assert f3.n_cached == {"exact": 0, "prefix": len(a), "off": 0}[policy]
        assert sched.stats()["requests_finished"] == 3
    finally:
        sched.shutdown()


def test_sliding_window_slot_reprefills_past_the_ring(tmp_path):
    """Gemma 3 (issue #15): a slot whose ring (window 4 + one 256-token batch = 260
    cells) has wrapped cannot resume a follow-up whose common prefix ends before what
    the ring kept; the scheduler prefills it from position 0 instead (nothing reported
    as cached) and the reply equals a fresh slot's, bit for bit.  A prefix the ring
    still covers is reused."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tools"))
    from make_synthetic import write_synthetic
    from runtime.model import Model
    from runtime.scheduler import Scheduler

    path = write_synthetic(tmp_path / "g.gguf", arch="gemma3", n_layers=6, d_model=256, n_heads=4,
                           head_dim=64, gqa=2, ffn=512, vocab=512, sliding_window=4, dtype=np.float16)
    m = Model.load(path, n_ctx=400)
    rng = np.random.default_rng(7)
    a = [int(t) for t in rng.integers(0, 512, 290)]
    b = a[:10] + [int(t) for t in rng.integers(0, 512, 30)]       # shares 10 tokens with a
    sched = Scheduler(m, 1, 400, cache_reuse="prefix").start()
    fresh = Scheduler(m, 1, 400, cache_reuse="off").start()
    try:
        slot = sched.slots[0].session
        assert slot.kv.k_swa.shape[1] == 4 + 256 < 400
        _run_scheduler(sched, a, n=10)
        assert slot.n_past == 299                                   # the ring has wrapped
        # within what the ring kept (positions 39..298): the prefix is reused
        c = a[:200] + [int(t) for t in rng.integers(0, 512, 5)]
        _, fc = _run_scheduler(sched, c, n=2)
        assert fc.n_cached == 200
        # before it: the window of position 10 needs keys 7.., overwritten long ago
        assert not slot.can_resume_at(10)
        text_b, fb = _run_scheduler(sched, b, n=8)
        assert fb.n_cached == 0 and fb.n_prompt == len(b)
        want_b, _ = _run_scheduler(fresh, b, n=8)
        assert text_b == want_b
    finally:
        sched.shutdown()
        fresh.shutdown()
