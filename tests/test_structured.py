"""Structured output (runtime.constraint): JSON-schema and grammar-constrained sampling.

The mask is checked against an independent JSON prefix automaton on the 262k
SentencePiece vocabulary (Gemma 3) and against the exact set a tiny grammar allows;
the sampler chain against a hand-masked reference; then SmolLM2 samples at
temperature 1.0 under several schemas and grammars, every output parsed and
validated (jsonschema), and the CLI flags and errors end to end.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.constraint import Constraint, ConstraintError, close_objects, ll_tokenizer
from runtime.generate import Timings, stream_reply
from runtime.sampling import Sampler, SamplerParams, apply_penalties, min_p, softmax, top_k, top_p

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    with GGUFFile(smollm2_path) as g:
        return Tokenizer.from_gguf(g)


@pytest.fixture(scope="module")
def gemma_tok(gemma3_path):
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    with GGUFFile(gemma3_path) as g:
        return Tokenizer.from_gguf(g)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from runtime.model import Model

    return Model.load(smollm2_path, n_ctx=2048)


# ---------------------------------------------------------------- an independent JSON prefix check

_WS = b" \t\n\r"


class _JSONPrefix:
    """Byte-level pushdown automaton for "is this a prefix of some JSON object"
    (RFC 8259, any whitespace JSON allows, a top-level object).  Written
    independently of llguidance, to check its masks; ``feed`` returns False at
    the first byte that no JSON text could continue with."""

    def __init__(self):
        self.stack: list[str] = []      # "{" / "["
        self.mode = "top"               # see feed()
        self.key = False                # the string being read is an object key
        self.lit = b""                  # rest of true/false/null
        self.utf8 = 0                   # continuation bytes still due in a string
        self.hex = 0                    # hex digits still due in a \\u escape

    def copy(self):
        c = _JSONPrefix.__new__(_JSONPrefix)
        c.stack, c.mode, c.key, c.lit, c.utf8, c.hex = list(self.stack), self.mode, self.key, self.lit, self.utf8, self.hex
        return c

    @property
    def complete(self) -> bool:
        return self.mode == "done"

    def _value(self, b: int) -> bool:
        if b == ord("{"):
            self.stack.append("{")
            self.mode = "key_or_end"
        elif b == ord("["):
            self.stack.append("[")
            self.mode = "value_or_end"
        elif b == ord('"'):
            self.mode, self.key = "string", False
        elif b == ord("-"):
            self.mode = "minus"
        elif b == ord("0"):
            self.mode = "zero"
        elif ord("1") <= b <= ord("9"):
            self.mode = "int"
        elif b in b"tfn":
            self.lit = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}[b]
            self.mode = "literal"
        else:
            return False
        return True

    def _after_value(self):
        self.mode = "after" if self.stack else "done"

    def _after(self, b: int) -> bool:
        if b in _WS:
            return True
        top = self.stack[-1]
        if b == ord(","):
            self.mode = "key" if top == "{" else "value"
            return True
        if (b == ord("}") and top == "{") or (b == ord("]") and top == "["):
            self.stack.pop()
            self._after_value()
            return True
        return False

    def feed(self, data: bytes) -> bool:
        for b in data:
            if not self._byte(b):
                return False
        return True

    def _byte(self, b: int) -> bool:
        m = self.mode
        if m == "top":
            if b in _WS:
                return True
            if b == ord("{"):
                self.stack.append("{")
                self.mode = "key_or_end"
                return True
            return False
        if m == "done":
            return b in _WS
        if m == "string":
            if self.utf8:
                if 0x80 <= b <= 0xBF:
                    self.utf8 -= 1
                    return True
                return False
            if b == ord('"'):
                if self.key:
                    self.mode = "colon"
                else:
                    self._after_value()
                return True
            if b == ord("\\"):
                self.mode = "escape"
                return True
            if b < 0x20:
                return False
            if b < 0x80:
                return True
            if 0xC2 <= b <= 0xDF:
                self.utf8 = 1
            elif 0xE0 <= b <= 0xEF:
                self.utf8 = 2
            elif 0xF0 <= b <= 0xF4:
                self.utf8 = 3
            else:
                return False
            return True
        if m == "escape":
            if b in b'"\\/bfnrt':
                self.mode = "string"
                return True
            if b == ord("u"):
                self.mode, self.hex = "hex", 4
                return True
            return False
        if m == "hex":
            if b in b"0123456789abcdefABCDEF":
                self.hex -= 1
                if not self.hex:
                    self.mode = "string"
                return True
            return False
        if m == "literal":
            if self.lit and b == self.lit[0]:
                self.lit = self.lit[1:]
                if not self.lit:
                    self._after_value()
                return True
            return False
        if m in ("key_or_end", "key"):
            if b in _WS:
                return True
            if b == ord('"'):
                self.mode, self.key = "string", True
                return True
            if m == "key_or_end" and b == ord("}"):
                self.stack.pop()
                self._after_value()
                return True
            return False
        if m == "colon":
            if b in _WS:
                return True
            if b == ord(":"):
                self.mode = "value"
                return True
            return False
        if m in ("value", "value_or_end"):
            if b in _WS:
                return True
            if m == "value_or_end" and b == ord("]"):
                self.stack.pop()
                self._after_value()
                return True
            return self._value(b)
        if m == "after":
            return self._after(b)
        # numbers: minus, zero, int, dot, frac, e, esign, exp
        digit = ord("0") <= b <= ord("9")
        if m == "minus":
            if b == ord("0"):
                self.mode = "zero"
            elif digit:
                self.mode = "int"
            else:
                return False
            return True
        if m in ("zero", "int", "frac", "exp"):
            if digit and m != "zero":
                return True
            if b == ord(".") and m in ("zero", "int"):
                self.mode = "dot"
                return True
            if b in b"eE" and m in ("zero", "int", "frac"):
                self.mode = "e"
                return True
            self._after_value()          # the number ended: this byte follows it
            return self._byte(b)
        if m == "dot":
            if digit:
                self.mode = "frac"
                return True
            return False
        if m == "e":
            if b in b"+-":
                self.mode = "esign"
                return True
            if digit:
                self.mode = "exp"
                return True
            return False
        if m == "esign":
            if digit:
                self.mode = "exp"
                return True
            return False
        raise AssertionError(m)


def test_json_prefix_checker_itself():
    def ok(s):
        return _JSONPrefix().feed(s.encode())

    assert ok('{"a": [1, -2.5e+3, "x\\u00e9", true, null], "b": {}}')
    assert ok('{"a": "caf') and ok('{"a": 12') and ok('  {') and ok('{"a": 1.')
    for bad in ('[1]', '{"a" 1', '{"a": 01', '{"a": tru e', '{"a": "\x01"', '{,', '{"a": 1}}',
                '{"a": 1.}', '{"a": "\\q"'):
        assert not ok(bad), bad
    p = _JSONPrefix()
    assert p.feed('{"a": [1]}'.encode()) and p.complete
    assert not _JSONPrefix().feed(b'{"a": "\xff"')


# ---------------------------------------------------------------- the vocabulary

def test_lltokenizer_from_gguf_vocab_is_built_once(smol_tok):
    llt = ll_tokenizer(smol_tok)
    assert llt.vocab_size == smol_tok.n_vocab == 49152
    # the end-of-generation set is ours (EOS, <|im_end|>, ...), given separately
    assert set(llt.eos_tokens) == set(smol_tok.eog_ids)
    t0 = time.perf_counter()
    assert ll_tokenizer(smol_tok) is llt            # cached per Tokenizer object
    assert time.perf_counter() - t0 < 0.01
    # our ids and bytes: decoding any ids gives token_to_piece's bytes
    ids = smol_tok.tokenize('{"name": "Zoë", "n": 12}', add_special=False)
    assert llt.decode_bytes(ids) == b"".join(smol_tok.token_to_piece(i) for i in ids)
    # llguidance tokenizes with our tokenizer (forced text): same ids
    assert llt.tokenize_str('{"name": "Zoë", "n": 12}') == ids
    # special tokens are special, and no text grammar can produce them
    im_end = smol_tok.token_to_id["<|im_end|>"]
    assert llt.is_special_token(im_end) and not llt.is_special_token(ids[0])


def _gemma_walk(gemma_tok, constraint, doc: str):
    """At each token boundary of ``doc``: (text so far, allowed ids)."""
    m = constraint.matcher()
    ids = gemma_tok.tokenize(doc, add_special=False)
    out = []
    text = b""
    for tid in ids:
        out.append((text, m.allowed_ids()))
        m.consume(tid)
        text += gemma_tok.token_to_piece(tid)
    out.append((text, m.allowed_ids()))
    return ids, out


def test_sentencepiece_262k_json_mask_admits_only_valid_continuations(gemma_tok):
    tok = gemma_tok
    assert tok.vocab_type == "spm" and tok.n_vocab == 262144
    llt = ll_tokenizer(tok)
    assert llt.vocab_size == 262144
    c = Constraint.json_object(tok)
    doc = '{"name": "Zoë Ünal", "tags": ["a", "b\\n"], "n": -12.5e3, "ok": true, "x": null}'
    ids, steps = _gemma_walk(tok, c, doc)
    assert len(ids) > 10
    pieces = [tok.token_to_piece(i) for i in range(tok.n_vocab)]
    specials = {i for i in range(tok.n_vocab) if llt.is_special_token(i)}
    eos = set(c.eos_ids)
    rng = np.random.default_rng(0)
    # (whitespace runs are bounded on purpose, and DEL is kept out of strings as
    # llama.cpp's JSON grammar does, although RFC 8259 allows it)
    one_byte = [i for i, p in enumerate(pieces) if len(p) == 1 and p not in (b" ", b"\t", b"\n", b"\r", b"\x7f")
                and i not in specials]
    for k, (text, allowed) in enumerate(steps):
        state = _JSONPrefix()
        assert state.feed(text), text
        allowed_set = set(allowed.tolist())
        if k < len(ids):
            assert ids[k] in allowed_set, (text, pieces[ids[k]])   # the real document stays allowed
        assert not (allowed_set & specials - eos), text               # no control/marker tokens
        assert bool(allowed_set & eos) == state.complete, text       # EOS exactly when complete
        # soundness: every allowed token keeps the text a JSON prefix (where
        # nearly the whole vocabulary is open, inside strings, 4000 drawn of them)
        check = sorted(allowed_set - eos)
        if len(check) > 4000:
            check = rng.choice(check, 4000, replace=False).tolist()
        for t in check:
            assert pieces[t], t                                      # no empty tokens
            assert state.copy().feed(pieces[t]), (text, pieces[t])
        # completeness where it is cheap to state: a single non-space byte that
        # keeps the text valid is allowed
        for t in one_byte:
            if state.mode == "escape" and pieces[t] == b"/":
                continue   # "\\/": llama.cpp's JSON grammar leaves that escape out too
            if state.copy().feed(pieces[t]):
                assert t in allowed_set, (text, pieces[t])
    # inside a string nearly the whole vocabulary is open; at the start only '{...' is
    in_string = next(a for t, a in steps if t.endswith(b'"Zo'))
    assert in_string.size > 200_000
    assert 0 < steps[0][1].size < 100
    assert all(pieces[t].lstrip(_WS).startswith(b"{") for t in steps[0][1])


# ---------------------------------------------------------------- the mask in the sampler chain

def _yes_no(smol_tok):
    """The tokens a grammar of exactly "yes" or "no" allows first: every token whose
    bytes are a non-empty prefix of one of them (computed from the vocabulary)."""
    return sorted(i for i in range(smol_tok.n_vocab)
                  if (p := smol_tok.token_to_piece(i)) and not smol_tok.is_control(i)
                  and (b"yes".startswith(p) or b"no".startswith(p)))


def test_mask_is_exactly_what_the_grammar_allows(smol_tok):
    c = Constraint.grammar(smol_tok, 'root ::= "yes" | "no"')
    m = c.matcher()
    want = _yes_no(smol_tok)
    assert len(want) >= 4
    assert m.allowed_ids().tolist() == want
    assert np.flatnonzero(m.allowed()).tolist() == want
    x = np.zeros(smol_tok.n_vocab, np.float32)
    m.apply(x)
    assert np.flatnonzero(np.isfinite(x)).tolist() == want


def test_sampler_chain_runs_on_the_allowed_tokens_only(smol_tok):
    c = Constraint.grammar(smol_tok, 'root ::= "yes" | "no"')
    allowed = np.array(_yes_no(smol_tok))
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, smol_tok.n_vocab).astype(np.float32)
    logits[:100] += 30       # the unconstrained top-k would hold no allowed token
    hist = [int(allowed[0])]
    for params in (SamplerParams(temp=1.0, top_k=3, top_p=0.9, min_p=0.05, repeat_penalty=1.5),
                   SamplerParams(temp=0.7, top_k=0, top_p=0.95, min_p=0.0),
                   SamplerParams(temp=1.0, top_k=0, top_p=0.8, min_p=0.02)):
        s = Sampler(params, constraint=c)
        ids, probs = s.probs(logits, hist)
        # reference: penalties, then disallowed -> -inf, then the unconstrained chain
        x = apply_penalties(logits, hist, params.repeat_last_n, params.repeat_penalty)
        masked = np.full_like(x, -np.inf)
        masked[allowed] = x[allowed]
        sub_ids, sub_x = allowed, masked[allowed]
        if params.top_k > 0:
            r_ids, r_x = top_k(sub_ids, sub_x, params.top_k)
            r_ids, r_x = top_p(r_ids, r_x, params.top_p, sorted_desc=True)
        else:
            r_ids, r_x = top_p(sub_ids, sub_x, params.top_p)
        r_ids, r_x = min_p(r_ids, r_x, params.min_p)
        r_p = softmax(r_x / params.temp)
        got = dict(zip(ids.tolist(), probs))
        want = dict(zip(r_ids.tolist(), r_p))
        assert set(got) == set(want) and set(got) <= set(allowed.tolist())
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-9)
    # greedy: the best allowed token after the repeat penalty
    s = Sampler(SamplerParams(temp=0, repeat_penalty=1e6), constraint=c)
    x = apply_penalties(logits, hist, 64, 1e6)
    assert s.sample(logits, hist) == int(allowed[np.argmax(x[allowed])])


def test_finished_forces_eos_and_reset_starts_over(smol_tok):
    c = Constraint.grammar(smol_tok, 'root ::= "yes" | "no"')
    yes = smol_tok.token_to_id.get("yes")
    assert yes is not None
    x = np.zeros(smol_tok.n_vocab, np.float32)
    x[yes] = 50.0
    s = Sampler(SamplerParams(temp=0), constraint=c)
    other = Sampler(SamplerParams(temp=0), constraint=c)    # same compiled constraint, own state
    assert not s.finished and not s.complete
    assert s.sample(x) == yes
    assert s.finished and s.complete
    assert not other.finished
    assert s.sample(x) == smol_tok.eos_id and smol_tok.eos_id in c.eos_ids   # only EOS may follow
    s.reset()
    assert not s.finished and s.sample(x) == yes


def test_regex_constraint_mask(smol_tok):
    m = Constraint.regex(smol_tok, "[0-9]{3}").matcher()
    want = [i for i in range(smol_tok.n_vocab)
            if (p := smol_tok.token_to_piece(i)) and len(p) <= 3 and p.isdigit()
            and not smol_tok.is_control(i)]
    assert m.allowed_ids().tolist() == want


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("schema, fragment", [
    ('{"type": "foo"}', "Invalid type"),
    ('{"type": "integer", "minimum": 5, "maximum": 1}', "minimum"),
    ('{"type": "string", "pattern": "(("}', "regex"),
    ('{"properties": {"a": {"$ref": "#/$defs/missing"}}}', "missing"),
    ('{"not": {"type": "string"}}', "not"),
    ('{"type": "object",', "not valid JSON"),
    ('[1, 2]', "must be an object"),
])
def test_bad_schema_is_a_clear_error(smol_tok, schema, fragment):
    with pytest.raises(ConstraintError) as e:
        Constraint.json_schema(smol_tok, schema)
    assert isinstance(e.value, ValueError)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("grammar", ['root ::= foo', 'root ::= "a" (', 'start: /[a-/', ''])
def test_bad_grammar_is_a_clear_error(smol_tok, grammar):
    with pytest.raises(ConstraintError) as e:
        Constraint.grammar(smol_tok, grammar)
    assert str(e.value) and "\n" not in str(e.value)


def test_close_objects_matches_llama_cpp_default():
    s = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                          "c": {"type": "array", "items": {"properties": {"d": {}}}}},
         "$defs": {"e": {"properties": {"f": {}}, "additionalProperties": True}},
         "allOf": [{"properties": {"g": {}}}]}
    out = close_objects(s)
    assert "additionalProperties" not in out                          # allOf beside it: left open
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["items"]["additionalProperties"] is False
    assert out["$defs"]["e"]["additionalProperties"] is True          # explicit: kept
    assert "additionalProperties" not in out["allOf"][0]
    assert "additionalProperties" not in s["properties"]["a"]        # a copy


# ---------------------------------------------------------------- SmolLM2 samples

def _prompt(model, user: str) -> list[int]:
    from runtime.chat_template import render_chat

    text = render_chat(model.gguf.get("tokenizer.chat_template"), [{"role": "user", "content": user}],
                       add_generation_prompt=True, bos_token="", eos_token="")
    return model.tokenizer.tokenize(text, add_special=True, parse_special=True)


def _samples(model, constraint, user: str, seeds, *, n_predict=256, temp=1.0):
    """One completion per seed, the prompt evaluated once (the cache is rewound to it)."""
    ids = _prompt(model, user)
    s = model.session()
    s.eval(ids)
    outs = []
    for seed in seeds:
        s.rewind(s.n_past - len(ids))      # logits() recomputes the prompt's last position
        sampler = Sampler(SamplerParams(temp=temp, seed=seed), constraint=constraint)
        t = Timings()
        text = "".join(stream_reply(s, model.tokenizer, sampler, n_predict=n_predict,
                                    n_ctx=model.n_ctx, history=list(ids), timings=t))
        outs.append((text, t))
    return outs


SCHEMAS = {
    "nested_required_optional": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "nickname": {"type": "string", "maxLength": 20},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 30},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"]},
        },
        "required": ["name", "age", "address"],
    },
    "arrays_min_max_items": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["cat", "dog", "fish", "bird"]},
                     "minItems": 2, "maxItems": 4},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": -10, "maximum": 10},
                       "minItems": 1, "maxItems": 3},
        },
        "required": ["tags", "scores"],
    },
    "enums_bounds_types": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "ok": {"type": "boolean"},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
        },
        "required": ["color", "size", "ok", "ratio", "count"],
    },
    "string_patterns": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[01][0-9]-[0-3][0-9]$"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
            "title": {"type": "string", "minLength": 3, "maxLength": 30},
        },
        "required": ["date", "code", "title"],
    },
    "array_of_refs": {
        "$defs": {"item": {"type": "object",
                           "properties": {"name": {"type": "string", "maxLength": 24},
                                          "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
                           "required": ["name", "qty"]}},
        "type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3,
    },
}

PROMPTS = {
    "nested_required_optional": "Make up a person: name, age, and address with city and zip code. Answer in JSON.",
    "arrays_min_max_items": "List some pets as tags and a few scores. Answer in JSON.",
    "enums_bounds_types": "Describe a T-shirt: color, size, whether it is ok, a ratio and a count. Answer in JSON.",
    "string_patterns": "Give an event with a date, a product code like ABC-123, and a title. Answer in JSON.",
    "array_of_refs": "Write a short shopping list with quantities. Answer in JSON.",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_twenty_samples_at_temperature_one_parse_and_validate(smol, name):
    schema = SCHEMAS[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    c = Constraint.json_schema(smol.tokenizer, schema)
    outs = _samples(smol, c, PROMPTS[name], range(20), n_predict=256, temp=1.0)
    texts = []
    for text, t in outs:
        assert t.stop == "eog" and t.complete, (t.stop, text)   # the grammar completed within -n 256
        value = json.loads(text)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (text, errors)
        texts.append(text)
    assert len(set(texts)) >= 10        # temperature 1.0 really samples


def test_gbnf_date_grammar_holds(smol):
    gbnf = r'''
root  ::= year "-" month "-" day
year  ::= [12] [0-9] [0-9] [0-9]
month ::= "0" [1-9] | "1" [0-2]
day   ::= "0" [1-9] | [12] [0-9] | "3" [01]
'''
    c = Constraint.grammar(smol.tokenizer, gbnf)
    outs = _samples(smol, c, "When did the first person walk on the Moon? Answer with a date.", range(10),
                    n_predict=32)
    for text, t in outs:
        assert t.stop == "eog" and t.complete
        m = re.fullmatch(r"([12][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])", text)
        assert m, text


def test_gbnf_arithmetic_grammar_holds(smol):
    gbnf = r'''
root   ::= expr
expr   ::= term (ws [-+] ws term){0,4}
term   ::= factor (ws [*/] ws factor){0,3}
factor ::= number | "(" ws expr ws ")"
number ::= "0" | [1-9] [0-9]{0,3}
ws     ::= " "?
'''
    # no leading zeros: "01" is a number to a looser grammar but not to Python's parser
    c = Constraint.grammar(smol.tokenizer, gbnf)
    outs = _samples(smol, c, "Write an arithmetic expression that equals 42.", range(10), n_predict=64)
    for text, t in outs:
        assert t.complete, text
        tree = ast.parse(text, mode="eval")
        kinds = {type(n).__name__ for n in ast.walk(tree)}
        assert kinds <= {"Expression", "BinOp", "Constant", "Add", "Sub", "Mult", "Div"}, (text, kinds)
        assert re.fullmatch(r"[0-9+\-*/() ]+", text), text


def test_greedy_with_a_permissive_grammar_equals_unconstrained_greedy(smol):
    anything = Constraint.grammar(smol.tokenizer, "start: /(?s:.*)/")
    for user in ("Write a haiku about the sea.", "What is 2+2? Explain briefly."):
        plain = _samples(smol, None, user, [0], n_predict=48, temp=0)[0]
        free = _samples(smol, anything, user, [0], n_predict=48, temp=0)[0]
        assert free[0] == plain[0] and free[1].n_gen == plain[1].n_gen > 8
        assert free[1].stop == plain[1].stop


# ---------------------------------------------------------------- the CLI

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RUNTIME_DEBUG", None)
    return env


def _cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], input=input,
                          capture_output=True, text=True, cwd=str(ROOT), env=_env(), timeout=300)


PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


def test_cli_generate_json_schema_from_file(smollm2_path, tmp_path):
    f = tmp_path / "person.json"
    f.write_text(json.dumps(PERSON))
    r = _cli("generate", smollm2_path, "-p", "A person as JSON:", "-j", f"@{f}", "-n", "128",
             "--temp", "1.0", "--seed", "7", "--json", "-c", "512")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and out["complete"] is True
    jsonschema.validate(json.loads(out["content"]), PERSON)
    assert out["tokens_predicted"] >= 5


def test_cli_grammar_file_and_cut_short_report(smollm2_path, tmp_path):
    g = tmp_path / "yn.gbnf"
    g.write_text('root ::= ("yes" | "no") "." \n')
    r = _cli("generate", smollm2_path, "-p", "Is the sky blue? Answer:", "--grammar-file", g, "--temp", "0",
             "--json", "-c", "256")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["content"] in ("yes.", "no.") and out["finish_reason"] == "stop"
    # -n runs out before the object closes: reported, not silently returned
    r = _cli("generate", smollm2_path, "-p", "A JSON object:", "--json-object", "-n", "4", "--temp", "0",
             "--json", "-c", "256")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "length" and out["complete"] is False
    assert "cut off" in r.stderr and "-n 4" in r.stderr
    with pytest.raises(ValueError):
        json.loads(out["content"])
    r = _cli("generate", smollm2_path, "-p", "A JSON object:", "--json-object", "-n", "4", "--temp", "0",
             "-c", "256")
    assert r.returncode == 0 and "generate: the output is cut off: -n 4 tokens ran out" in r.stderr


@pytest.mark.parametrize("flags, fragment", [
    (["-j", '{"type": "foo"}'], "error: invalid JSON schema: Invalid type: foo"),
    (["-j", "@/nonexistent/schema.json"], "error: cannot read the JSON schema file"),
    (["--grammar", "root ::= undefined_rule"], "error: invalid grammar"),
])
def test_cli_bad_constraint_is_one_line(smollm2_path, flags, fragment):
    r = _cli("generate", smollm2_path, "-p", "x", "-c", "256", *flags)
    assert r.returncode == 1
    assert r.stderr.strip().startswith(fragment), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_constraint_flags_are_exclusive(smollm2_path):
    r = _cli("generate", smollm2_path, "-p", "x", "--json-object", "--grammar", 'root ::= "a"')
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_cli_chat_piped_replies_follow_the_schema(smollm2_path):
    r = _cli("chat", smollm2_path, "-j", json.dumps(PERSON), "--temp", "0", "-n", "128", "-c", "1024",
             input="Tell me about a person.\nAnd another one, older.\n")
    assert r.returncode == 0, r.stderr
    # two replies, each one JSON value (pretty-printed ones span lines), each valid:
    # every reply starts the grammar afresh
    dec, pos, replies = json.JSONDecoder(), 0, []
    text = r.stdout
    while text[pos:].strip():
        value, end = dec.raw_decode(text, pos + len(text[pos:]) - len(text[pos:].lstrip()))
        replies.append(value)
        pos = end
    assert len(replies) == 2, r.stdout
    for value in replies:
        jsonschema.validate(value, PERSON)
