"""Tokenizer equality with llama.cpp (llama-cpp-python, vocab-only loads).

Vocabularies: SmolLM2 (BPE, pre=smollm), a qwen2-pre GGUF written here from
SmolLM2's vocabulary and merges, Gemma 3 (SentencePiece, 262k), plus the same
BPE vocabulary under the other pre-tokenizers we implement and a Gemma variant
with add_space_prefix (Llama-2 style)."""

from __future__ import annotations

import ctypes
import random
import warnings

import pytest

from runtime.gguf import GGUFFile
from runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

from _tokenizer_util import write_vocab_gguf

EDGE = [
    "", " ", "  ", "   leading", "trailing   ", "a  b   c    d", "\t", "\t\tx\ty", "\n",
    "\n\n\nfoo\n", "a\r\nb\rc", " \n \n  ", "   \t\n  \r\n\t ",
    "12345678901", "1 22 333 4444", "3.14159 and 2,000,000", "x1y22z333", "ＡＢＣ１２３",
    "don't I'll you're we've he'd she's I'M DON'T WE'VE", "'s 's '' 'S 'll",
    "Hello 👋🏽 world 🇫🇷 👨‍👩‍👧", "你好，世界！这是一个测试。", "日本語のテキストとカタカナ",
    "한국어 텍스트", "مرحبا بالعالم 123", "Привет мир", "ελληνικά \u1f7d\u1fbe \u2126\u212a",
    "mixed: abc 中文 العربية 😀 ١٢٣ ⅫⅣ ½ ²", "e\u0301 combining \u0915\u094d\u0937",
    "ctrl\x00\x01\x07\x1b[0m\x7f end", "\x1c\x1d\x1e\x1f sep", "\u0085next\u2028line",
    "\u00a0nbsp\u2003em\u3000ideo", "\u200bzero\u200dwidth", "a\U000E0080b \U000E0080 x",
    "\uffff\U0010FFFF", "$+<=>^~|` !!!??...", "'hello' \"quoted\"", "--==**##",
    "http://example.com/a?b=c&d=e", "def f(x):\n    return x**2\n",
    "A" * 300, " " * 100 + "x", "=" * 200,
    # special-token texts (matched only with parse_special, user-defined ones always)
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "a<|im_end|>b",
    "<|im_start|><|im_start|>", "<bos><eos><start_of_turn>user\nhi<end_of_turn>\n",
    "<unk> <unk>", "<unused0>x", "[multimodal]", " <start_of_image> ",
]

# pre-tokenizers exercised on SmolLM2's vocabulary besides its own "smollm"
PRE_VARIANTS = ["qwen2", "llama-bpe", "gpt-2", "default", "deepseek-llm", "deepseek-coder",
                "deepseek-v3", "falcon", "tekken", "bloom", "viking", "chatglm-bpe", "qwen35"]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gemma_md(gemma3_path):
    with GGUFFile(gemma3_path) as g:
        return dict(g.metadata)


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory, smol_md, gemma_md, smollm2_path, gemma3_path):
    """name -> GGUF path: the two real models and the vocab-only variants."""
    d = tmp_path_factory.mktemp("vocab")
    files = {"smollm": smollm2_path, "gemma3": gemma3_path}
    for pre in PRE_VARIANTS:
        files[pre] = write_vocab_gguf(d / f"{pre}.gguf", smol_md, pre=pre)
    files["smollm-bos-eos"] = write_vocab_gguf(d / "bos_eos.gguf", smol_md,
                                               add_bos_token=True, add_eos_token=True)
    files["gemma3-space-prefix"] = write_vocab_gguf(d / "gemma_sp.gguf", gemma_md,
                                                    add_space_prefix=True)
    return files


@pytest.fixture(scope="module")
def ref_models(llama_cpp):
    """path -> llama_cpp.Llama (vocab only), loaded once, closed at the end."""
    cache: dict = {}

    def get(path):
        key = str(path)
        if key not in cache:
            cache[key] = llama_cpp.Llama(model_path=key, vocab_only=True, verbose=False)
        return cache[key]

    yield get
    for llm in cache.values():
        llm.close()


def _ours(path) -> Tokenizer:
    with GGUFFile(path) as g, warnings.catch_warnings():
        warnings.simplefilter("error")
        return Tokenizer.from_gguf(g)


def _ref_piece(llama_cpp, llm, tid, special):
    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, tid, buf, 1024, 0, special)
    assert 0 <= n <= 1024
    return bytes(buf[:n])


def _ref_detok(llama_cpp, llm, ids, special=False):
    """Llama.detokenize without llama-cpp-python's 32-byte piece buffer limit."""
    data = b"".join(_ref_piece(llama_cpp, llm, i, special) for i in ids)
    if ids and ids[0] == llm.token_bos() and data[:1] == b" ":
        data = data[1:]
    return data.decode("utf-8", "replace")


# ------------------------------------------------------- equality with llama.cpp
@pytest.mark.parametrize("name", ["smollm", "qwen2", "gemma3"])
def test_wikitext_every_line_matches_llama_cpp(name, vocab_files, wikitext, llama_cpp, ref_models):
    path = vocab_files[name]
    llm, tok = ref_models(path), _ours(path)
    lines = wikitext.split("\n")
    ref = [llm.tokenize(line.encode(), add_bos=True, special=False) for line in lines]
    ours = [tok.tokenize(line, add_special=True) for line in lines]
    bad = [i for i in range(len(lines)) if ref[i] != ours[i]]
    assert not bad, f"{len(bad)} of {len(lines)} lines differ, first: {lines[bad[0]]!r}"
    # and the whole file as one text (llama.cpp: about a second)
    assert tok.tokenize(wikitext, add_special=False) == llm.tokenize(
        wikitext.encode(), add_bos=False, special=False)


@pytest.mark.parametrize("name", ["smollm", "gemma3", "gemma3-space-prefix", "smollm-bos-eos"]
                         + PRE_VARIANTS)
def test_edge_suite_matches_llama_cpp(name, vocab_files, wikitext, llama_cpp, ref_models):
    path = vocab_files[name]
    llm, tok = ref_models(path), _ours(path)
    for text in EDGE:
        for add_special in (False, True):
            for parse_special in (False, True):
                ref = llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)
                ours = tok.tokenize(text, add_special=add_special, parse_special=parse_special)
                assert ours == ref, (text, add_special, parse_special)
    if name not in ("smollm", "gemma3", "qwen2"):  # those run the whole file above
        for line in wikitext.split("\n")[:150]:
            assert tok.tokenize(line, False) == llm.tokenize(line.encode(), add_bos=False,
                                                             special=False), line


@pytest.mark.parametrize("name", ["smollm", "gemma3", "gemma3-space-prefix"])
def test_detokenize_and_round_trip(name, vocab_files, wikitext, llama_cpp, ref_models):
    path = vocab_files[name]
    llm, tok = ref_models(path), _ours(path)
    texts = EDGE + wikitext.split("\n")[:300]
    n_round_trips = 0
    for text in texts:
        for parse_special in (False, True):
            ids = tok.tokenize(text, add_special=True, parse_special=parse_special)
            for special in (False, True):
                assert tok.detokenize(ids, special=special) == _ref_detok(
                    llama_cpp, llm, ids, special), (text, parse_special, special)
        ids = tok.tokenize(text, add_special=True)
        if _ref_detok(llama_cpp, llm, ids) == text:  # where llama.cpp's round trip holds
            assert tok.detokenize(ids) == text
            n_round_trips += 1
    # (lines opening with a space lose it after BOS in Llama.detokenize, so not all hold)
    assert n_round_trips >= 40


@pytest.mark.parametrize("name", ["smollm", "gemma3"])
def test_special_ids_eog_and_pieces_match_llama_cpp(name, vocab_files, llama_cpp, ref_models):
    path = vocab_files[name]
    llm, tok = ref_models(path), _ours(path)
    v = llm._model.vocab
    nul = lambda i: None if i < 0 else i  # noqa: E731
    assert tok.n_vocab == llama_cpp.llama_vocab_n_tokens(v)
    assert tok.bos_id == nul(llama_cpp.llama_vocab_bos(v))
    assert tok.eos_id == nul(llama_cpp.llama_vocab_eos(v))
    assert tok.eot_id == nul(llama_cpp.llama_vocab_eot(v))
    assert tok.pad_id == nul(llama_cpp.llama_vocab_pad(v))
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(v)
    assert tok.add_eos == llama_cpp.llama_vocab_get_add_eos(v)
    ref_eog = {i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(v, i)}
    assert tok.eog_ids == ref_eog and tok.is_eog(tok.eos_id)
    step = 1 if tok.n_vocab < 60000 else 13
    ids = sorted(set(range(0, tok.n_vocab, step)) | set(tok._special_all))
    for i in ids:
        for special in (False, True):
            assert tok.token_to_piece(i, special) == _ref_piece(llama_cpp, llm, i, special), i


_FUZZ_ALPHABET = (list(" \t\n\r\x0b\x0c") + list("aAzZ09'sStTmMdDlLrRvVeE.,!?-_=+$<>|^~`()[]{}\"/\\:;")
                  + ["é", "ß", "Ω", "\u1f7d", "\u212a", "中", "文", "カ", "한", "ب", "\u0301", "\u094d",
                     "क", "😀", "👋", "\u200d", "\u200b", "\u00a0", "\u3000", "\u2028", "\x85", "\x00",
                     "\x1b", "\x7f", "\ue000", "\U000E0080", "١", "²", "½", "Ⅻ", "€", "…", "。", "，",
                     "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>", "<unk>",
                     "<start_of_turn>", "\n\n", "   ", "'ll", "'RE", "123", "4567"])


@pytest.mark.parametrize("name", ["smollm", "qwen2", "llama-bpe", "gemma3", "gemma3-space-prefix"])
def test_random_strings_match_llama_cpp(name, vocab_files, llama_cpp, ref_models):
    """Seeded random mixes of scripts, whitespace, digits and special-token texts."""
    path = vocab_files[name]
    llm, tok = ref_models(path), _ours(path)
    rng = random.Random(1234)
    for _ in range(400):
        text = "".join(rng.choice(_FUZZ_ALPHABET) for _ in range(rng.randint(1, 25)))
        special = rng.random() < 0.5
        assert tok.tokenize(text, parse_special=special) == llm.tokenize(
            text.encode(), add_bos=True, special=special), (text, special)


# ------------------------------------------------------------- streaming decode
def test_stream_decoder_never_emits_half_a_character(smol_md, gemma_md):
    text = "naïve café — 你好 👋🏽 𐍈𐌰 ∑x² done"
    for md in (smol_md, gemma_md):
        tok = Tokenizer.from_metadata(md)
        ids = tok.tokenize(text, add_special=True)
        assert len(ids) > len(text.split())  # multi-byte characters span several tokens
        dec = tok.decoder()
        assert isinstance(dec, StreamDecoder)
        parts = [dec.feed(i) for i in ids]
        parts.append(dec.flush())
        assert "".join(parts) == tok.detokenize(ids) == text
        assert all("\ufffd" not in p for p in parts)
        # a character whose bytes are split across tokens appears whole, in one part
        for ch in "ï你👋𐍈":
            assert any(ch in p for p in parts)


def test_stream_decoder_replaces_invalid_utf8(smol_md, gemma_md):
    bpe = Tokenizer.from_metadata(smol_md)
    euro = bpe.tokenize("€")  # 3 bytes: E2 82 AC
    lone = [i for i in range(bpe.n_vocab) if bpe.token_to_piece(i) == b"\x82"]
    assert lone
    dec = bpe.decoder()
    out = dec.feed(lone[0]) + dec.feed(bpe.tokenize("A")[0])
    assert out == "\ufffdA"
    assert bpe.detokenize([lone[0]] + bpe.tokenize("A")) == "\ufffdA"
    # an incomplete character at the end: held back, then replaced on flush
    spm = Tokenizer.from_metadata(gemma_md)
    b = [spm.token_to_id["<0xE2>"], spm.token_to_id["<0x82>"]]
    dec = spm.decoder()
    assert dec.feed(b[0]) == "" and dec.feed(b[1]) == ""
    assert dec.flush() == "\ufffd"
    assert spm.detokenize(b) == "\ufffd"
    assert bpe.detokenize(euro) == "€"


# -------------------------------------------------------------- other behaviour
def test_unknown_pre_falls_back_to_default_with_warning(smol_md):
    md = dict(smol_md, **{"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.warns(UserWarning, match="unknown pre-tokenizer"):
        tok = Tokenizer.from_metadata(md)
    default = Tokenizer.from_metadata(dict(smol_md, **{"tokenizer.ggml.pre": "default"}))
    own = Tokenizer.from_metadata(smol_md)
    text = "In 1999, 12345 people said: don't!!! $100+ <=> ~|"
    assert tok.tokenize(text) == default.tokenize(text)
    assert tok.tokenize(text) != own.tokenize(text)  # smollm splits digits, default does not


def test_bad_metadata_gives_clear_errors(smol_md):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_metadata({})
    with pytest.raises(TokenizerError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_metadata(dict(smol_md, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_metadata({k: v for k, v in smol_md.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(TokenizerError, match="malformed"):
        Tokenizer.from_metadata(dict(smol_md, **{"tokenizer.ggml.scores": ["x"] * 49152}))
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_metadata(dict(smol_md, **{"tokenizer.ggml.merges": [1, 2]}))
    toks = list(smol_md["tokenizer.ggml.tokens"])
    toks[5] = toks[6]
    with pytest.raises(TokenizerError, match="duplicate token"):
        Tokenizer.from_metadata(dict(smol_md, **{"tokenizer.ggml.tokens": toks}))
    tok = Tokenizer.from_metadata(smol_md)
    with pytest.raises(ValueError, match="out of range"):
        tok.detokenize([tok.n_vocab])
    with pytest.raises(TypeError):
        tok.tokenize(b"bytes")
    # a lone surrogate cannot be encoded: it is tokenized as U+FFFD, not an exception
    assert tok.tokenize("a\ud800b") == tok.tokenize("a\ufffdb")
    assert issubclass(TokenizerError, ValueError)


def test_bpe_heap_merge_equals_scan_merge(smol_md):
    """The O(n log n) merge used for long words gives the scan's result."""
    tok = Tokenizer.from_metadata(smol_md)
    rng = random.Random(0)
    alphabet = list("aeinrstlĠĊ0123.,") + ["ing", "th"]
    for _ in range(300):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 80)))
        assert tok._bpe_merge_heap(word) == tok._bpe_merge_scan(word)


def test_from_gguf_accepts_gguf_file_and_metadata(smollm2_path, smol_md):
    with GGUFFile(smollm2_path) as g:
        a = Tokenizer.from_gguf(g)
    b = Tokenizer.from_metadata(smol_md)
    # ids as llama.cpp gives them (Llama.tokenize(b"Hello, world!", add_bos=True))
    assert a.tokenize("Hello, world!") == b.tokenize("Hello, world!") == [19556, 28, 905, 17]
    assert (a.bos_id, a.eos_id, a.unk_id, a.add_bos, a.n_vocab) == (1, 2, 0, False, 49152)
    assert a.is_eog(2) and not a.is_eog(1)
