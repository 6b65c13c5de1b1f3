"""Tokenizers built from GGUF metadata alone, with llama.cpp's token ids.

Two vocabulary types are supported, selected by ``tokenizer.ggml.model``:

* ``gpt2``: byte-level BPE (GPT-2 ``bytes_to_unicode`` alphabet, merge ranks
  from ``tokenizer.ggml.merges``).  Text is first split into words by the
  pre-tokenizer regexes that llama.cpp picks from ``tokenizer.ggml.pre``; each
  word is then merged independently, so results are cached per word.
* ``llama``: SentencePiece-style vocabularies (scores + ``<0xNN>`` byte
  fallback), tokenized with llama.cpp's bigram algorithm: repeatedly merge the
  adjacent pair whose concatenation is the highest-scoring token.

Everything mirrors llama.cpp's ``llama-vocab.cpp`` / ``unicode.cpp``, including
its quirks, because the ids must be identical: the special-token partition
(longest special token first, user-defined tokens even when
``parse_special=False``), the per-token attributes it patches in at load time
(EOT/EOG detection by token text), and ``token_to_piece``.  ``detokenize``
follows llama-cpp-python's ``Llama.detokenize`` (concatenated pieces, one
leading space dropped after a BOS).

The pre-tokenizer regexes run on the ``regex`` package, which is also what
llama.cpp generated its Unicode category tables with, so ``\\p{L}``, ``\\p{N}``
and ``\\s`` agree.  llama.cpp's hand-written splitters for the GPT-2 and Llama-3
patterns differ slightly from the regexes they implement (e.g. a lone
whitespace that no alternative matches becomes its own piece); the Python
patterns below reproduce those splitters, not the regex text.
"""

from __future__ import annotations

import codecs
import heapq
import re as _re  # the trie regexes: plain literals, faster in the standard engine
import warnings
from array import array

import regex

__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError"]


class TokenizerError(ValueError):
    """The GGUF metadata does not describe a tokenizer we can build."""


# llama.cpp's token attributes (llama_token_attr) and GGUF token types.
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

_TYPE_TO_ATTR = {0: ATTR_UNDEFINED, 1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL,
                 4: ATTR_USER_DEFINED, 5: ATTR_UNUSED, 6: ATTR_BYTE}

SPACE_MARK = "\u2581"  # SentencePiece's visible space "▁"

# --------------------------------------------------------------------------
# Pre-tokenizer regexes, exactly as llama.cpp lists them (llm_tokenizer_bpe).
# --------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_CI = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
           r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# (code points that Unicode normalisation would fold are written as escapes)
_DEEPSEEK_LLM = [
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
]
_DEEPSEEK_CODER = ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"]
_DEEPSEEK3 = [
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]
_FALCON = ["[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2, "[0-9][0-9][0-9]"]
_STARCODER = ["\\p{N}", _GPT2]
_BLOOM = [" ?[^(\\s|.,!?…。，、।۔،)]+"]
_VIKING = [" ?[^(\\s|.,!?…。，、।۔،)]+", "\\p{N}"]
_TEKKEN = [
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?"
    "((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
]
_DEFAULT = ["[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2, "\\p{N}+", "[0-9][0-9][0-9]"]

# name of tokenizer.ggml.pre -> (regex list, flags llama.cpp sets for it)
_PRE = {}
for _names, _exprs, _flags in [
    (["default"], _DEFAULT, {}),
    (["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
      "lfm2", "jina-v5-nano"], [_LLAMA3], {"ignore_merges": True, "add_bos": True}),
    (["dbrx", "smaug-bpe"], [_LLAMA3], {}),
    (["chatglm-bpe", "glm4"], [_LLAMA3], {"bos_null": True}),
    (["deepseek-llm"], _DEEPSEEK_LLM, {}),
    (["deepseek-coder"], _DEEPSEEK_CODER, {}),
    (["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"], _DEEPSEEK3, {}),
    (["falcon"], _FALCON, {}),
    (["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
      "mellum2"], _STARCODER, {}),
    (["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
      "a.x-4.0", "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe",
      "exaone4", "mpt", "olmo", "jais", "trillion", "granite-docling"], [_GPT2], {}),
    (["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
      "solar-open"], [_QWEN2], {}),
    (["qwen35"], [_QWEN35], {}),
    (["poro-chat", "bloom", "gpt3-finnish"], _BLOOM, {}),
    (["viking"], _VIKING, {}),
    (["tekken"], _TEKKEN, {"ignore_merges": True, "add_bos": True}),
]:
    for _n in _names:
        _PRE[_n] = (_exprs, _flags)

# llama.cpp does not use a regex engine for these two patterns but hand-written
# splitters; these Python patterns reproduce the splitters (trailing ``\s+`` and
# single-character fallbacks included) so that every character lands in a piece.
_GPT2_EXACT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
               r"|\s+(?!\S)|\s+|[\s\S]")
_LLAMA3_EXACT = (r"'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+|[\s\S]")
# "\p{N}" followed by the GPT-2 splitter (smollm, starcoder, ...) fused into one
# pass: digits stand alone and whitespace before a digit ends its piece.
_STARCODER_FUSED = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"
                    r"|\s+(?![^\s\p{N}])|\s+|[\s\S]")

# non-ASCII code points that the regex package's \s (and so llama.cpp) treats as whitespace
_WS_NON_ASCII = ("\x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B))
                 + "\u2028\u2029\u202f\u205f\u3000")


def _translate_ecmascript(expr: str) -> str:
    """std::regex (ECMAScript) pattern -> Python ``regex`` pattern.

    llama.cpp runs patterns with Unicode categories on a "collapsed" text in
    which every non-ASCII code point stands for its category, so ``\\p{Lu}``
    there matches any letter; ``$`` is the end of the piece."""
    for sub in ("Lu", "Ll", "Lt", "Lm", "Lo"):
        expr = expr.replace("\\p{%s}" % sub, "\\p{L}")
    out, i, inside = [], 0, False
    while i < len(expr):
        c = expr[i]
        if c == "\\":
            out.append(expr[i:i + 2])
            i += 2
            continue
        if c == "[" and not inside:
            inside = True
        elif c == "]" and inside:
            inside = False
        elif c == "$" and not inside:
            c = r"\Z"
        out.append(c)
        i += 1
    return "".join(out)


class _Splitter:
    """One regex of a pre-tokenizer: cuts each piece into matches and gaps."""

    def __init__(self, expr: str):
        self.covers_all = False  # every character ends up in some match
        if expr == _GPT2:
            self.pattern = regex.compile(_GPT2_EXACT)
            self.covers_all = True
        elif expr in (_LLAMA3, _LLAMA3_CI):
            self.pattern = regex.compile(_LLAMA3_EXACT)
            self.covers_all = True
        else:
            self.pattern = regex.compile(_translate_ecmascript(expr))
        # llama.cpp runs category-free patterns with std::wregex on a text in which
        # non-ASCII whitespace became U+000B; it matters for literal ranges.
        self.wide = "\\p{" not in expr

    def split(self, text: str, wide_text: str, pieces: list[tuple[int, int]]):
        subject = wide_text if self.wide else text
        out = []
        finditer = self.pattern.finditer
        for start, end in pieces:
            pos = start
            for m in finditer(subject, start, end):
                s, e = m.span()
                if s == e:
                    continue
                if s > pos:
                    out.append((pos, s))
                out.append((s, e))
                pos = e
            if pos < end:
                out.append((pos, end))
        return out


class _PreTokenizer:
    def __init__(self, exprs: list[str]):
        self.fused = None
        if exprs == _STARCODER:
            self.fused = regex.compile(_STARCODER_FUSED)
        elif len(exprs) == 1 and exprs[0] in (_GPT2, _LLAMA3, _LLAMA3_CI):
            self.fused = _Splitter(exprs[0]).pattern
        self.splitters = [_Splitter(e) for e in exprs]
        self.need_wide = any(s.wide for s in self.splitters)
        self._wide_table = {ord(c): "\x0b" for c in _WS_NON_ASCII}

    def words(self, text: str) -> list[str]:
        if self.fused is not None:
            return self.fused.findall(text)
        wide = text.translate(self._wide_table) if self.need_wide else text
        pieces = [(0, len(text))]
        for sp in self.splitters:
            pieces = sp.split(text, wide, pieces)
        return [text[s:e] for s, e in pieces]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = (list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100)))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}

# Token texts by which llama.cpp recognises special tokens (llama_vocab::impl::load).
_EOT_TEXTS = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>"]
_EOM_TEXTS = ["<|eom_id|>"]
_FIM_TEXTS = {
    "pre": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
            "▁<PRE>", "<|code_prefix|>", "<|prefix|>"],
    "suf": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
            "▁<SUF>", "<|code_suffix|>", "<|suffix|>"],
    "mid": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
            "▁<MID>", "<|code_middle|>", "<|middle|>"],
    "pad": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "rep": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "sep": ["<|file_sep|>"],
}
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
              "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~["}

_CACHE_LIMIT = 1 << 18  # words cached per tokenizer before the cache is reset
_CACHE_MAX_WORD = 64     # longer words are not cached: rare, and a cached one pins its text
_SHORT_TEXT = 2048       # texts up to this length look for special tokens one token at a time
_STRIP_WS = " \t\n\v\f\r"  # what llama.cpp's LSTRIP/RSTRIP remove beside a special token
_MAX_TRIE_DEPTH = 100    # branch points along one special token in the trie regex (else: scan)

# A merge-heap entry is one int, rank << 32 | position: the heap pops the lowest rank
# first and, among equal ranks, the leftmost pair, as llama.cpp's queues do.
_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1


_END = ""  # trie key marking where a token ends (no token text is empty)


def _trie(ids_by_text: dict[str, int]) -> dict:
    """Nested dicts, one level per character; ``node[_END]`` is the id of the
    token ending there."""
    root: dict = {}
    for text, tid in ids_by_text.items():
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node[_END] = tid
    return root


def _trie_regex(node: dict, depth: int = 0) -> str:
    """A regex matching exactly the trie's tokens: ``<|im_start|>`` and
    ``<|im_end|>`` become ``<\\|im_(?:start|end)\\|>``.  Its cost per text
    position is the depth matched, not the number of tokens; a token that ends
    where others go on becomes a greedy optional group, so a match is the
    longest token starting at its position."""
    if depth > _MAX_TRIE_DEPTH:
        raise RecursionError("special-token trie too deep for a regex")
    run = _run_length(node)
    if run:  # tokens c^k ... c^(k+run), each a prefix of the next (Gemma's whitespace runs)
        (c,) = (ch for ch in node if ch != _END)
        return f"{_re.escape(c)}{{0,{run}}}"  # one greedy repeat, not `run` nested groups
    alts = []
    for ch, child in node.items():
        if ch == _END:
            continue
        lit = [ch]
        while len(child) == 1 and _END not in child:  # a chain without branches: one literal
            (c, child), = child.items()
            lit.append(c)
        alts.append(_re.escape("".join(lit)) + _trie_regex(child, depth + 1))
    if not alts:
        return ""
    body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
    return f"(?:{body})?" if _END in node else body


def _run_length(node: dict) -> int:
    """m when the tokens below ``node`` (itself a token's end) are that token
    followed by 1..m copies of one character and nothing else; else 0."""
    m, run_char = 0, None
    while _END in node and len(node) == 2:
        (c,) = (ch for ch in node if ch != _END)
        if run_char not in (None, c):
            return 0
        run_char, node = c, node[c]
        m += 1
    return m if m and node.keys() == {_END} else 0


class _SpecialFinder:
    """Where special tokens start in a text, in one regex pass.

    The trie regex sits in a lookahead, so every position is tried; at each it
    reports the longest token starting there.  Any other token starting there
    is a prefix of that one, so ``find`` files each position once, under its
    longest token, and ``extensions[t]`` lists the tokens whose text starts
    with t's (t included): t's occurrences are the positions filed under those.
    ``ok`` is False when the texts make too deep a trie for Python's regex
    compiler (a hostile vocabulary): the caller then searches token by token."""

    def __init__(self, ids_by_text: dict[str, int]):
        root = _trie(ids_by_text)
        self.longest: dict[str, int] = ids_by_text
        self.extensions: dict[int, list[int]] = {}
        for text, tid in ids_by_text.items():
            node = root
            for ch in text:  # the tokens on text's trie path are its prefixes
                node = node[ch]
                if _END in node:
                    self.extensions.setdefault(node[_END], []).append(tid)
        try:
            self.pattern = _re.compile("(?=(" + _trie_regex(root) + "))") if root else None
            self.ok = True
        except (RecursionError, _re.error, OverflowError, MemoryError):
            self.ok = False

    def find(self, text: str) -> dict[int, list[int]]:
        """longest token id -> ascending positions where it is the longest that starts."""
        found: dict[int, list[int]] = {}
        if self.pattern is None:
            return found
        longest = self.longest
        for m in self.pattern.finditer(text):
            tid = longest[m.group(1)]
            starts = found.get(tid)
            if starts is None:
                found[tid] = [m.start()]
            else:
                starts.append(m.start())
        return found


def _merge_by_priority(word: str, priority) -> list[str]:
    """Greedy pairwise merging, as llama.cpp's BPE and SPM queues do it: while
    some adjacent pair of symbols has a priority (``priority(left, right)``, an
    int, lower first, None = cannot merge), merge the first pair of the lowest.

    Memory is what makes a long word without spaces expensive, so the state is
    compact: a symbol is a span of ``word`` (its start indexes three int arrays:
    length, next start, previous start), and a heap entry is one int, priority
    << 32 | start of the left symbol.  An entry is not removed when its pair
    changes; when popped, it is used only if the pair now at that start still
    has that priority.  That accepts exactly the pairs a queue of (priority,
    left, right) entries would, in the same order: a pair's entry is pushed
    whenever the pair forms, and a symbol only grows by taking its right
    neighbour.  O(n log n) time, about 60 bytes per character."""
    n = len(word)
    if n == 0:
        return []
    size = array("q", [1]) * n             # length of the symbol starting here, 0 once merged away
    nxt = array("q", range(1, n + 1))
    nxt[-1] = -1
    prev = array("q", range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        p = priority(word[i], word[i + 1])
        if p is not None:
            heap.append(p << _POS_BITS | i)
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        key = pop(heap)
        a = key & _POS_MASK
        b = nxt[a]
        if b < 0 or not size[a]:
            continue
        end = b + size[b]
        if priority(word[a:b], word[b:end]) != key >> _POS_BITS:
            continue  # the pair changed since this entry was pushed
        size[a] = end - a
        size[b] = 0
        c = nxt[b]
        nxt[a] = c
        if c >= 0:
            prev[c] = a
            p = priority(word[a:end], word[c:c + size[c]])
            if p is not None:
                push(heap, p << _POS_BITS | a)
        z = prev[a]
        if z >= 0:
            p = priority(word[z:a], word[a:end])
            if p is not None:
                push(heap, p << _POS_BITS | z)
    out = []
    i = 0
    while i >= 0:
        out.append(word[i:i + size[i]])
        i = nxt[i]
    return out


class Tokenizer:
    """A llama.cpp-identical tokenizer built from ``tokenizer.ggml.*`` metadata."""

    # ------------------------------------------------------------------ load
    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        """Build from an open ``runtime.GGUFFile`` (or anything with ``.metadata``)."""
        return cls.from_metadata(gguf.metadata)

    @classmethod
    def from_metadata(cls, md: dict) -> "Tokenizer":
        """Build from a metadata dict (``tokenizer.ggml.*`` keys, as GGUFFile.metadata)."""
        try:
            return cls(md)
        except TokenizerError:
            raise
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
            # metadata comes from strangers: a wrong type anywhere is a bad file
            raise TokenizerError(f"malformed tokenizer metadata: {type(e).__name__}: {e}") from e

    def __init__(self, md: dict):
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("GGUF has no tokenizer (tokenizer.ggml.model is missing)")
        if model == "llama":
            self.vocab_type = "spm"
        elif model == "gpt2":
            self.vocab_type = "bpe"
        else:
            raise TokenizerError(f"unsupported tokenizer model {model!r} "
                                 "(supported: 'gpt2' BPE and 'llama' SentencePiece)")
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None or len(tokens) == 0:
            raise TokenizerError("GGUF has no vocabulary (tokenizer.ggml.tokens)")
        n = len(tokens)
        scores = md.get("tokenizer.ggml.scores")
        types = md.get("tokenizer.ggml.token_type")
        if scores is not None and len(scores) < n:
            raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        if types is not None and len(types) < n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

        self.n_vocab = n
        self.tokens: list[str] = []
        self.token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TokenizerError(f"token {i} is not a string")
            if t == "":
                t = f"[EMPTY_{i}]"
            if t in self.token_to_id:
                raise TokenizerError(f"duplicate token in vocabulary: {t!r} has ids "
                                     f"{self.token_to_id[t]} and {i}")
            self.token_to_id[t] = i
            self.tokens.append(t)
        self.scores = [0.0] * n if scores is None else [float(s) for s in _as_list(scores[:n])]
        self.attrs = ([ATTR_NORMAL] * n if types is None
                      else [_TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in _as_list(types[:n])])

        # -- vocabulary-type defaults, then the pre-tokenizer (llama.cpp order)
        self.pre = md.get("tokenizer.ggml.pre") or ""
        ignore_merges = False
        if self.vocab_type == "spm":
            bos, eos, unk = 1, 2, 0
            self.add_bos, self.add_space_prefix = True, True
            self._pre = None
        else:
            bos, eos, unk = 11, 11, None
            self.add_bos, self.add_space_prefix = False, False
            pre = self.pre
            if not pre:
                warnings.warn("BPE vocabulary without tokenizer.ggml.pre; using the default "
                              "pre-tokenizer, as llama.cpp does", stacklevel=3)
                pre = "default"
            elif pre not in _PRE:
                warnings.warn(f"unknown pre-tokenizer {pre!r}; using the default regexes "
                              "(token ids may differ from the model's own tokenizer)",
                              stacklevel=3)
                pre = "default"
            exprs, flags = _PRE[pre]
            ignore_merges = flags.get("ignore_merges", False)
            self.add_bos = flags.get("add_bos", False)
            if flags.get("bos_null"):
                bos = None
            self._pre = _PreTokenizer(exprs)
        self.add_eos = False
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix",
                                            self.add_space_prefix))
        self.ignore_merges = ignore_merges

        def special_id(key, default):
            if default is not None and default >= n:
                default = None
            v = md.get(f"tokenizer.ggml.{key}")
            if v is None:
                return default
            v = int(v)
            return v if 0 <= v < n else default

        ids = {k: special_id(k + "_token_id", d) for k, d in [
            ("bos", bos), ("eos", eos), ("eot", None), ("eom", None), ("unknown", unk),
            ("seperator", None), ("padding", None), ("mask", None)]}
        fim = {k: special_id(f"fim_{k}_token_id", None) for k in _FIM_TEXTS}
        for old, new in [("prefix", "pre"), ("suffix", "suf"), ("middle", "mid")]:
            v = special_id(f"{old}_token_id", None)
            if v is not None:
                fim[new] = v
        if "tokenizer.ggml.add_bos_token" in md:
            self.add_bos = bool(md["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in md:
            self.add_eos = bool(md["tokenizer.ggml.add_eos_token"])
        if self.add_bos and ids["bos"] is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true, but there is no BOS token")
        if self.add_eos and ids["eos"] is None:
            raise TokenizerError("tokenizer.ggml.add_eos_token is true, but there is no EOS token")

        # -- special tokens recognised by their text (lowest id wins where llama.cpp's
        #    unordered_map order is unspecified); they become CONTROL tokens
        def find(texts):
            hits = [self.token_to_id[t] for t in texts if t in self.token_to_id]
            return min(hits) if hits else None

        def make_control(i):
            self.attrs[i] |= ATTR_CONTROL

        if ids["eot"] is None:
            ids["eot"] = find(_EOT_TEXTS)
            if ids["eot"] is not None:
                make_control(ids["eot"])
        if ids["eom"] is None:
            ids["eom"] = find(_EOM_TEXTS)
            if ids["eom"] is not None:
                make_control(ids["eom"])
        for k, texts in _FIM_TEXTS.items():
            if fim[k] is None:
                fim[k] = find(texts)
                if fim[k] is not None:
                    make_control(fim[k])
        for i, t in enumerate(self.tokens):
            if self.attrs[i] & ATTR_CONTROL and "unused" in t:
                self.attrs[i] |= ATTR_UNUSED

        eog = {fim[k] for k in ("pad", "rep", "sep") if fim[k] is not None}
        for t in _EOG_TEXTS:
            i = self.token_to_id.get(t)
            if i is not None:
                eog.add(i)
                make_control(i)
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
            if t in self.token_to_id:
                self.attrs[self.token_to_id[t]] = ATTR_USER_DEFINED
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
        texts_eog = {self.tokens[i]: i for i in eog}
        if ("<|end|>" in texts_eog and ("<|call|>" in texts_eog or "<|calls|>" in texts_eog)
                and ("<|return|>" in texts_eog or "<|flush|>" in texts_eog)):
            eog.discard(texts_eog["<|end|>"])
            self.attrs[texts_eog["<|end|>"]] = ATTR_USER_DEFINED
        if "<|tool_response>" in texts_eog and "</s>" in texts_eog:
            eog.discard(texts_eog["</s>"])
            self.attrs[texts_eog["</s>"]] = ATTR_NORMAL
        self.eog_ids = frozenset(eog)

        name = str(md.get("general.name", "")).lower()
        if any(s in self.pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
                s in str(md.get("general.architecture", "")) for s in ("nomic-bert-moe", "jina-bert-v3")):
            if "<mask>" in self.token_to_id:
                self.attrs[self.token_to_id["<mask>"]] |= ATTR_LSTRIP
        elif "phi-3" in name or "phi3" in name:
            for i in range(n):
                if self.attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN):
                    self.attrs[i] |= ATTR_RSTRIP
            for t, on in [("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)]:
                if t in self.token_to_id:
                    i = self.token_to_id[t]
                    self.attrs[i] = self.attrs[i] | ATTR_RSTRIP if on else self.attrs[i] & ~ATTR_RSTRIP

        self.bos_id, self.eos_id, self.eot_id = ids["bos"], ids["eos"], ids["eot"]
        self.pad_id, self.unk_id, self.eom_id = ids["padding"], ids["unknown"], ids["eom"]
        self.sep_id, self.mask_id = ids["seperator"], ids["mask"]
        self.fim_ids = dict(fim)  # pre/suf/mid/pad/rep/sep -> id or None

        # special-token partition order: longest text first (stable by id for ties)
        special = [i for i in range(n)
                   if self.attrs[i] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        special.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._special_all = special
        self._special_user = [i for i in special if not self.attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)]

        if self.vocab_type == "bpe":
            merges = md.get("tokenizer.ggml.merges")
            if merges is None:
                raise TokenizerError("BPE vocabulary without tokenizer.ggml.merges")
            ranks: dict[tuple[str, str], int] = {}
            for r, m in enumerate(merges):
                if not isinstance(m, str):
                    raise TokenizerError(f"tokenizer.ggml.merges[{r}] is not a string")
                pos = m.find(" ", 1)
                pair = (m[:pos], m[pos + 1:]) if pos >= 0 else ("", "")
                ranks.setdefault(pair, r)
            self._ranks = ranks
        else:
            self._byte_ids = [self._spm_byte_token(b) for b in range(256)]
            # a cut before "▁" is safe unless some token holds "<c>▁" for the char before it
            glue = {t[k - 1] for t in self.tokens if SPACE_MARK in t[1:]
                    for k in range(1, len(t)) if t[k] == SPACE_MARK and t[k - 1] != SPACE_MARK}
            cls = "".join(regex.escape(c) for c in sorted(glue))
            self._spm_cut = regex.compile(f"(?<=[^{SPACE_MARK}{cls}])(?={SPACE_MARK})")
        self._cache: dict[str, tuple[int, ...]] = {}
        self._special_finders: dict[bool, _SpecialFinder] = {}  # parse_special -> finder, built on first use
        self._score_rank: list[int] | None = None               # SPM: built on the first long piece
        self._pieces: list[bytes | None] = [None] * n
        self._pieces_special: list[bytes | None] = [None] * n

    def _spm_byte_token(self, b: int) -> int | None:
        i = self.token_to_id.get("<0x%02X>" % b)
        if i is None and b < 128:
            i = self.token_to_id.get(chr(b))
        return i

    # ---------------------------------------------------------------- encode
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` exactly as llama.cpp's ``llama_tokenize``.

        ``add_special`` adds BOS/EOS where the vocabulary asks for them;
        ``parse_special`` lets control tokens written in the text (``<|im_end|>``)
        become their ids.  User-defined tokens are always matched, like llama.cpp."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize() takes str, not {type(text).__name__}")
        if _has_surrogates(text):  # lone surrogates cannot be UTF-8: replace them
            text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
        out: list[int] = []
        frags = self._partition(text, parse_special) if text else []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        if self.vocab_type == "spm":
            prev_special = True
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    self._spm_encode(f.replace(" ", SPACE_MARK), out)
                    prev_special = False
        else:
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    self._bpe_encode(f, out)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list:
        """Split out special tokens as llama.cpp's tokenizer_st_partition does.

        llama.cpp takes the special tokens one at a time, longest first, and
        cuts every leftmost non-overlapping occurrence out of the raw text that
        is still left (an LSTRIP/RSTRIP token also eats the whitespace beside
        it).  Cutting by slicing off the rest of the text after each hit costs
        O(N) per hit, so O(N^2) for a text full of special tokens; here the
        same selection is made on positions: where the tokens start is found
        first (``_special_starts``), then the tokens are taken in llama.cpp's
        order, an occurrence only where all its characters are still raw.
        A position that got cut is dropped from the candidates for good, so
        the whitespace-run tokens of Gemma ("  " ... 31 spaces, each a prefix
        of the next) do not try every position of a long run again.  O(N)
        time and memory for N characters."""
        order = self._special_all if parse_special else self._special_user
        starts_at, extensions = self._special_starts(text, parse_special)
        if not starts_at:
            return [text]
        n = len(text)
        taken = bytearray(n)   # 1 = cut out: a special token, or whitespace it stripped
        cuts = []              # (start, end, token id) of every token cut out
        for tid in order:
            keys = [k for k in extensions.get(tid, (tid,)) if k in starts_at]
            if not keys:
                continue
            starts = starts_at[keys[0]] if len(keys) == 1 else sorted(
                p for k in keys for p in starts_at[k])
            size = len(self.tokens[tid])
            mark = b"\x01" * size
            attr = self.attrs[tid]
            for s in starts:
                e = s + size
                if taken.find(1, s, e) >= 0:
                    continue  # overlaps a longer token, or this token's previous hit
                taken[s:e] = mark
                cuts.append((s, e, tid))
                if attr & ATTR_LSTRIP:  # the raw whitespace just before it goes
                    j = s
                    while j > 0 and not taken[j - 1] and text[j - 1] in _STRIP_WS:
                        j -= 1
                    taken[j:s] = b"\x01" * (s - j)
                if attr & ATTR_RSTRIP:  # and/or the raw whitespace just after it
                    j = e
                    while j < n and not taken[j] and text[j] in _STRIP_WS:
                        j += 1
                    taken[e:j] = b"\x01" * (j - e)
            for k in keys:  # positions now cut can start no token: drop them
                live = [p for p in starts_at[k] if not taken[p]]
                if live:
                    starts_at[k] = live
                else:
                    del starts_at[k]
        if not cuts:
            return [text]
        cuts.sort()
        frags: list = []
        pos = 0
        for s, e, tid in cuts + [(n, n, None)]:
            # between two tokens: the raw text, less any stripped whitespace at its two ends
            first = taken.find(0, pos, s)
            if first >= 0:
                frags.append(text[first:taken.rfind(0, pos, s) + 1])
            if tid is not None:
                frags.append(tid)
            pos = e
        return frags

    def _special_starts(self, text: str, parse_special: bool):
        """(starts_at, extensions) for _partition: the occurrences of the special
        tokens in ``text`` as ``starts_at[k]``, ascending start positions, where
        token t's occurrences are those filed under the ids ``extensions[t]``
        (default: t alone).

        A short text is searched token by token (a C substring scan each, so
        ``starts_at`` is keyed by the token itself); a long one by
        _SpecialFinder, in one pass whose cost does not grow with the number
        of special tokens (Gemma has 6414)."""
        order = self._special_all if parse_special else self._special_user
        if not order or not text:
            return {}, {}
        finder = self._special_finders.get(parse_special)
        if finder is None and len(text) > _SHORT_TEXT:
            finder = self._special_finders[parse_special] = _SpecialFinder(
                {self.tokens[i]: i for i in order})
        if finder is not None and finder.ok:
            return finder.find(text), finder.extensions
        starts_at: dict[int, list[int]] = {}
        chars = set(text)
        for tid in order:
            tok = self.tokens[tid]
            if tok[0] not in chars:
                continue
            k = text.find(tok)
            if k < 0:
                continue
            starts = starts_at[tid] = []
            while k >= 0:
                starts.append(k)
                k = text.find(tok, k + 1)
        return starts_at, {}

    # BPE ---------------------------------------------------------------
    def _bpe_encode(self, text: str, out: list[int]) -> None:
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for word in self._pre.words(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR))
                if len(word) <= _CACHE_MAX_WORD:
                    cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        vocab = self.token_to_id
        if self.ignore_merges and word in vocab:
            return (vocab[word],)
        syms = self._bpe_merge_heap(word) if len(word) > 48 else self._bpe_merge_scan(word)
        out = []
        for s in syms:
            i = vocab.get(s)
            if i is not None:
                out.append(i)
            else:  # llama.cpp falls back to single-byte tokens, dropping what it cannot find
                out.extend(vocab[c] for c in s if ord(c) < 128 and c in vocab)
        return tuple(out)

    def _bpe_merge_scan(self, word: str) -> list[str]:
        """Merge the lowest-rank adjacent pair (leftmost on ties) until none is left."""
        ranks = self._ranks
        syms = list(word)
        while len(syms) > 1:
            best, best_rank = -1, 1 << 62
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            syms[best:best + 2] = [syms[best] + syms[best + 1]]
        return syms

    def _bpe_merge_heap(self, word: str) -> list[str]:
        """Same result as _bpe_merge_scan in O(n log n): llama.cpp's priority queue."""
        ranks = self._ranks
        return _merge_by_priority(word, lambda left, right: ranks.get((left, right)))

    # SentencePiece -------------------------------------------------------
    def _spm_encode(self, text: str, out: list[int]) -> None:
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        for piece in self._spm_cut.split(text):
            if not piece:
                continue
            ids = cache.get(piece)
            if ids is None:
                ids = self._spm_piece(piece)
                if len(piece) <= _CACHE_MAX_WORD:
                    cache[piece] = ids
            out.extend(ids)

    def _spm_piece(self, text: str) -> tuple[int, ...]:
        """llama.cpp's SPM: merge the best-scoring adjacent pair that forms a token."""
        vocab = self.token_to_id
        if len(text) > 48:
            syms = self._spm_merge_heap(text)
        else:
            syms = self._spm_merge_small(text)
        out = []
        for s in syms:
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
            else:  # byte fallback: <0xNN> per UTF-8 byte
                for b in s.encode("utf-8"):
                    bid = self._byte_ids[b]
                    if bid is None:
                        bid = self.unk_id
                    if bid is not None:
                        out.append(bid)
        return tuple(out)

    def _spm_merge_small(self, text: str) -> list[str]:
        """The merge on a short piece: a heap of (-score, left, right, size)."""
        vocab, scores = self.token_to_id, self.scores
        sym = list(text)
        n = len(sym)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap = []

        def push(a, b):
            if a >= 0 and b >= 0:
                merged = sym[a] + sym[b]
                tid = vocab.get(merged)
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], a, b, len(merged)))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, a, b, size = heapq.heappop(heap)
            if not sym[a] or not sym[b] or len(sym[a]) + len(sym[b]) != size:
                continue
            sym[a], sym[b] = sym[a] + sym[b], ""
            nxt[a] = nxt[b]
            if nxt[b] >= 0:
                prev[nxt[b]] = a
            push(prev[a], a)
            push(a, nxt[a])
        return [s for s in sym if s]

    def _spm_merge_heap(self, text: str) -> list[str]:
        """_spm_merge_small's result in compact memory, for long pieces: the
        priority is the score's rank (equal scores, equal rank), so that an
        entry is one int."""
        vocab = self.token_to_id
        rank = self._score_ranks()

        def priority(left, right):
            tid = vocab.get(left + right)
            return None if tid is None else rank[tid]

        return _merge_by_priority(text, priority)

    def _score_ranks(self) -> list[int]:
        """token id -> position of its score in descending order (ties share one)."""
        if self._score_rank is None:
            # NaN (a broken file) would make the order undefined: it ranks last
            key = [s if s == s else float("-inf") for s in self.scores]
            level = {v: r for r, v in enumerate(sorted(set(key), reverse=True))}
            self._score_rank = [level[v] for v in key]
        return self._score_rank

    # ---------------------------------------------------------------- decode
    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes llama.cpp's ``llama_token_to_piece`` gives for one token.

        Control and unknown tokens render as nothing unless ``special``."""
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} out of range (vocabulary has {self.n_vocab})")
        attr = self.attrs[token_id]
        if not special and attr & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        cache = self._pieces_special if special else self._pieces
        piece = cache[token_id]
        if piece is None:
            piece = self._piece(token_id, attr)
            cache[token_id] = piece
        return piece

    def _piece(self, tid: int, attr: int) -> bytes:
        text = self.tokens[tid]
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if self.vocab_type == "spm":
                return text.replace(SPACE_MARK, " ").encode("utf-8")
            out = bytearray()
            for c in text:
                b = _CHAR_TO_BYTE.get(c)
                if b is None:  # llama_decode_text's marker for a non-byte-level char
                    out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode() + b"]"
                else:
                    out.append(b)
            return bytes(out)
        if attr & ATTR_BYTE and text.startswith("<0x") and len(text) >= 5:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""

    def detokenize(self, ids, special: bool = False) -> str:
        """Text of ``ids`` as llama-cpp-python's ``Llama.detokenize`` (decoded as
        UTF-8, invalid bytes replaced by U+FFFD): the pieces concatenated, with one
        leading space dropped when the first token is BOS."""
        ids = list(ids)
        data = b"".join(self.token_to_piece(int(i), special) for i in ids)
        if ids and ids[0] == self.bos_id and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", "replace")

    def decoder(self, special: bool = False) -> "StreamDecoder":
        """A streaming decoder: feed ids one at a time, get text as soon as it is
        complete UTF-8 (never half a character)."""
        return StreamDecoder(self, special)

    def is_eog(self, token_id: int) -> bool:
        """End of generation: EOS, EOT, EOM and the tokens llama.cpp adds by text."""
        return token_id in self.eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self.attrs[token_id] & ATTR_CONTROL)

    def __repr__(self):
        return (f"Tokenizer({self.vocab_type}, n_vocab={self.n_vocab}, pre={self.pre!r}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the newly completed text.

    Bytes of a multi-byte character split across tokens are held back until the
    character is complete; invalid UTF-8 becomes U+FFFD, never an exception.
    The concatenated output (plus ``flush()``) equals ``Tokenizer.detokenize``."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._first = True
        self._strip_space = False

    def feed(self, token_id: int) -> str:
        data = self.tokenizer.token_to_piece(int(token_id), self.special)
        if self._first:
            self._first = False
            self._strip_space = token_id == self.tokenizer.bos_id
        if self._strip_space and data:
            self._strip_space = False
            if data[:1] == b" ":
                data = data[1:]
        return self._utf8.decode(data, False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", True)
