"""Structured output: sampling constrained by a JSON schema or a grammar (llguidance).

A :class:`Constraint` is a compiled grammar over one vocabulary; it is reusable
across requests.  Each :class:`~runtime.sampling.Sampler` given a constraint
holds its own :class:`Matcher` (the parse state of one output), which before
every token computes the set of tokens that keep the output a prefix of some
sentence of the grammar, and after it consumes the token drawn::

    c = Constraint.json_schema(tokenizer, {"type": "object", ...})
    sampler = Sampler(params, constraint=c)      # penalties -> mask -> top-k/p, min-p, temp
    tok = sampler.sample(logits, history)        # always an allowed token
    sampler.finished                             # the grammar is complete: stop

The engine is llguidance (the Rust library behind llama.cpp's ``-DLLAMA_LLGUIDANCE``
backend): an Earley parser over a lazily built lexer DFA, walking a trie of the
vocabulary's token bytes, so a mask costs tens to hundreds of microseconds instead of
the tens of milliseconds per token that llama.cpp's own GBNF sampler is known for on
large vocabularies.

Its tokenizer (``LLTokenizer``) is built here from our GGUF vocabulary, never from
a hub download, with our token ids: each token's bytes are what
``Tokenizer.token_to_piece`` gives (byte-level BPE and SentencePiece alike,
``<0xNN>`` byte tokens as their byte).  Special tokens (control, unknown, and
user-defined ones that look like ``<...>``) get the 0xFF prefix that llguidance
reserves for them, as its llama.cpp binding does: 0xFF never occurs in UTF-8, so
no text grammar can match them (for plain text they are as good as empty), while a
Lark grammar can still name one (``<|im_end|>``).  The end-of-generation tokens
are given separately, as the EOS set.  Building it walks the whole vocabulary
(about 0.3 s for 49k tokens, 2 s for 262k), so it is built once per
``Tokenizer`` object and cached.

JSON whitespace: llguidance would allow any run of whitespace between tokens, and a
small model sampled at temperature 1 can then emit newlines until ``-n`` runs
out.  Schemas therefore default to llama.cpp's own JSON-grammar rule (at most one
space, or one or two newlines and up to 20 spaces/tabs of indentation); a
schema's ``"x-guidance"`` options override it.
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from pathlib import Path

import numpy as np

__all__ = ["Constraint", "ConstraintError", "Matcher", "ll_tokenizer", "close_objects",
           "load_schema_arg", "from_args"]


class ConstraintError(ValueError):
    """A schema or grammar that cannot be compiled (or a matcher that broke)."""


# llama.cpp's json-schema-to-grammar SPACE_RULE: | " " | "\n"{1,2} [ \t]{0,20}
JSON_WHITESPACE = r"[ ]?|\n{1,2}[ \t]{0,20}"

_ATTR_UNKNOWN = 1 << 0
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _llg():
    try:
        import llguidance
    except ImportError as e:  # a declared dependency: only a broken install gets here
        raise ImportError("structured output needs the llguidance package "
                          "(pip install llguidance)") from e
    return llguidance


def _eos_ids(tokenizer) -> list[int]:
    eos = sorted(tokenizer.eog_ids)
    if not eos and tokenizer.eos_id is not None:
        eos = [tokenizer.eos_id]
    if not eos:
        # the grammar's end must be expressible as a token, or an accepting state
        # that could still go on (e.g. [0-9]+) could never stop
        raise ConstraintError("the vocabulary has no end-of-generation token; "
                              "constrained sampling needs one")
    return eos


def token_table(tokenizer) -> tuple[list[bytes], list[int]]:
    """(bytes of every token, ids of the special ones), in llguidance's convention."""
    tokens: list[bytes] = []
    special: list[int] = []
    for i in range(tokenizer.n_vocab):
        attr = tokenizer.attrs[i]
        if attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
            # token_to_piece renders these as nothing; 0xFF + their text lets a
            # grammar name them while keeping them out of every text match
            special.append(i)
            tokens.append(b"\xff" + tokenizer.token_to_piece(i, True))
            continue
        piece = tokenizer.token_to_piece(i)
        if attr & _ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">") and len(piece) > 2:
            # e.g. Gemma's <start_of_image>: a marker, not text the model writes in
            # a JSON string (llguidance's llama.cpp binding draws the same line)
            special.append(i)
            piece = b"\xff" + piece
        tokens.append(piece)
    return tokens, special


class _Vocab:
    """What llguidance's TokenizerWrapper reads: token bytes, BOS/EOS, and a
    text -> ids function (llguidance tokenizes forced text with it; masks never do)."""

    def __init__(self, tokenizer, tokens, special, eos):
        # SentencePiece puts "▁" before the first word of a prompt; llguidance
        # tokenizes pieces of the output, whose bytes must come back unchanged, so
        # it gets a view of the tokenizer without that prefix (a shallow copy: the
        # vocabulary and caches are shared)
        self._tok = copy.copy(tokenizer)
        self._tok.add_space_prefix = False
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text):
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        return self._tok.tokenize(text, add_special=False, parse_special=False)


def ll_tokenizer(tokenizer):
    """The llguidance LLTokenizer for one of our Tokenizers, built once and cached
    (keyed by the Tokenizer object, so a model's tokenizer is walked once however many
    requests are constrained)."""
    with _cache_lock:
        hit = _cache.get(tokenizer)
        if hit is not None:
            return hit
        llg = _llg()
        tokens, special = token_table(tokenizer)
        eos = _eos_ids(tokenizer)
        wrapper = llg.TokenizerWrapper(_Vocab(tokenizer, tokens, special, eos))
        llt = llg.LLTokenizer(wrapper, n_vocab=tokenizer.n_vocab, eos_token=eos)
        _cache[tokenizer] = llt
        return llt


_KIND_NAMES = {"json_schema": "JSON schema", "json_object": "JSON schema",
               "grammar": "grammar", "regex": "regular expression"}


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


# Keywords whose values are subschemas: maps of them, lists of them, or one.
_SUB_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUB_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUB_ONE = ("items", "additionalProperties", "additionalItems", "unevaluatedItems", "contains",
            "propertyNames", "not", "if", "then", "else")


def close_objects(schema, _in_all_of: bool = False):
    """The schema with ``"additionalProperties": false`` added to every object schema
    that lists ``properties`` and says nothing about other keys, as llama.cpp's
    JSON-schema grammars do ("produces faster grammars + reduces hallucinations"):
    plain JSON Schema would let a model append keys of its own choosing, which is
    how a small model wanders off into an endless string.  An explicit
    ``additionalProperties`` (``true`` to allow them) is kept.  Schemas combined
    with allOf/anyOf/oneOf are left open, since closing one part would reject the
    keys another part adds.  Returns a copy."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SUB_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: close_objects(v) for name, v in out[k].items()}
    for k in _SUB_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [close_objects(v) for v in out[k]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(v, _in_all_of=True) for v in out["allOf"]]
    for k in _SUB_ONE:
        v = out.get(k)
        if isinstance(v, dict):
            out[k] = close_objects(v)
        elif k == "items" and isinstance(v, list):  # draft-4 tuple form
            out[k] = [close_objects(x) for x in v]
    if (not _in_all_of and isinstance(out.get("properties"), dict)
            and not any(k in out for k in ("additionalProperties", "patternProperties",
                                             "unevaluatedProperties", "allOf", "anyOf", "oneOf"))):
        out["additionalProperties"] = False
    return out


class Constraint:
    """A compiled grammar over one tokenizer's vocabulary; make one with
    :meth:`json_schema`, :meth:`json_object`, :meth:`grammar` or :meth:`regex`.
    Raises :class:`ConstraintError` (a ValueError) when it cannot be compiled."""

    def __init__(self, tokenizer, grammar: str, kind: str, source=None):
        llg = _llg()
        self.tokenizer = tokenizer
        self.kind = kind            # "json_schema", "json_object", "grammar", "regex"
        self.source = source        # what the user gave (schema dict, grammar text)
        self.grammar_spec = grammar  # llguidance's grammar JSON
        self.n_vocab = tokenizer.n_vocab
        self._llt = ll_tokenizer(tokenizer)
        self.eos_ids = list(self._llt.eos_tokens)
        # what sample() returns once the grammar is complete: the model's own EOS
        # where it ends generation, else the first end-of-generation token
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id in self.eos_ids else self.eos_ids[0]
        what = _KIND_NAMES[kind]
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._llt)
        if is_error:
            raise ConstraintError(f"invalid {what}: {_one_line(messages[0])}")
        self.warnings = [_one_line(m) for m in messages]
        # Compiled once here; each Matcher is a deep copy of this pristine one, which
        # shares the compiled grammar and lexer (no recompilation per request).
        self._proto = llg.LLMatcher(self._llt, grammar, log_level=0)
        if self._proto.is_error():
            raise ConstraintError(f"invalid {what}: {_one_line(self._proto.get_error())}")

    # ------------------------------------------------------------ constructors
    @classmethod
    def json_schema(cls, tokenizer, schema) -> "Constraint":
        """Output that is one JSON value valid under ``schema`` (a dict, or JSON text)."""
        if isinstance(schema, (str, bytes, bytearray)):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"a JSON schema must be an object (or true/false), "
                                  f"got {type(schema).__name__}")
        llg = _llg()
        try:
            spec = llg.LLMatcher.grammar_from_json_schema(
                close_objects(schema), defaults={"whitespace_pattern": JSON_WHITESPACE})
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid JSON schema: {_one_line(e)}") from None
        return cls(tokenizer, spec, "json_schema", schema)

    @classmethod
    def json_object(cls, tokenizer) -> "Constraint":
        """Any JSON object (llama.cpp's --json-object, OpenAI's ``json_object``)."""
        c = cls.json_schema(tokenizer, {"type": "object"})
        c.kind = "json_object"
        return c

    @classmethod
    def grammar(cls, tokenizer, text: str) -> "Constraint":
        """A GBNF grammar (llama.cpp's ``root ::= ...`` syntax) or a Lark grammar
        as llguidance reads it (``start: ...``); which one is detected from the text."""
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("the grammar is empty")
        llg = _llg()
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(text)
        except Exception as e:  # the converter raises assorted types on bad GBNF
            raise ConstraintError(f"invalid grammar: {_one_line(e)}") from None
        return cls(tokenizer, llg.LLMatcher.grammar_from_lark(lark), "grammar", text)

    @classmethod
    def regex(cls, tokenizer, pattern: str) -> "Constraint":
        """Output matching a regular expression (Rust regex syntax), in full."""
        llg = _llg()
        return cls(tokenizer, llg.LLMatcher.grammar_from_regex(pattern), "regex", pattern)

    def matcher(self) -> "Matcher":
        """A fresh parse state for one output."""
        return Matcher(self)

    def __repr__(self):
        return f"Constraint({self.kind}, n_vocab={self.n_vocab})"


class Matcher:
    """The parse state of one constrained output (not thread-safe; one per sampler)."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.n_vocab = constraint.n_vocab
        self.eos_id = constraint.eos_id
        self._m = constraint._proto.deep_copy()
        self._words = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        self.n_consumed = 0

    def reset(self) -> None:
        """Back to the start of the grammar (a new output)."""
        self._m.reset()
        self.n_consumed = 0

    # ------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence (it may still go on)."""
        return self._m.is_accepting()

    # ------------------------------------------------------------ per token
    def _compute(self) -> np.ndarray:
        """The mask as llguidance writes it: int32 words, bit j of word w = token 32w+j."""
        m = self._m
        # fills the buffer in Rust with the GIL released (a server's other threads run)
        m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if m.is_error():
            raise ConstraintError(f"grammar matcher failed: {_one_line(m.get_error())}")
        return self._words

    def allowed_ids(self) -> np.ndarray:
        """int64 ids of the tokens that keep the output a prefix of a sentence,
        ascending (EOS ids only where the output is complete)."""
        words = self._compute()
        n = self.n_vocab
        nz = np.flatnonzero(words)
        if nz.size * 4 < words.size:
            # Structure (after '{', a key, a number) allows a handful of tokens:
            # unpack only the words that hold any, not all n bits.
            bits = np.unpackbits(words[nz].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
            ids = (nz[:, None] * 32 + np.arange(32))[bits.view(np.bool_)]
            ids = ids[ids < n]
        else:
            ids = np.flatnonzero(np.unpackbits(words.view(np.uint8), count=n, bitorder="little"))
        if ids.size == 0:
            raise ConstraintError("the grammar allows no token here "
                                  f"({_one_line(self._m.get_error()) or 'dead end'})")
        return ids.astype(np.int64, copy=False)

    def allowed(self) -> np.ndarray:
        """Bool [n_vocab]: True where the token is allowed next."""
        words = self._compute()
        return np.unpackbits(words.view(np.uint8), count=self.n_vocab, bitorder="little").view(np.bool_)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Set the logits of disallowed tokens to -inf, in place (logits past the
        vocabulary, a padded output layer, too); returns the allowed ids."""
        ids = self.allowed_ids()
        keep = logits[ids].copy()
        logits[:] = -np.inf
        logits[ids] = keep
        return ids

    def consume(self, token: int) -> None:
        """Advance past a drawn token (one the mask allowed)."""
        if not self._m.consume_token(int(token)):
            raise ConstraintError(f"token {token} does not fit the grammar: "
                                  f"{_one_line(self._m.get_error())}")
        self.n_consumed += 1


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConstraintError(f"cannot read the {what} file {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConstraintError(f"the {what} file {path!r} is not UTF-8 text") from None


def load_schema_arg(value: str) -> str:
    """A ``-j/--json-schema`` argument: JSON text, or ``@FILE`` naming a file of it
    (llama.cpp's ``-j`` takes the text; ``@`` saves quoting a long schema)."""
    return _read_text(value[1:], "JSON schema") if value.startswith("@") else value


def from_args(args, tokenizer) -> Constraint | None:
    """The constraint the CLI flags ask for (-j/--json-schema, --json-object,
    --grammar, --grammar-file), or None."""
    if getattr(args, "json_schema", None) is not None:
        return Constraint.json_schema(tokenizer, load_schema_arg(args.json_schema))
    if getattr(args, "json_object", False):
        return Constraint.json_object(tokenizer)
    if getattr(args, "grammar", None) is not None:
        return Constraint.grammar(tokenizer, args.grammar)
    if getattr(args, "grammar_file", None) is not None:
        return Constraint.grammar(tokenizer, _read_text(args.grammar_file, "grammar"))
    return None
