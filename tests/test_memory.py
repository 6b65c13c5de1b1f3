"""Memory planner: its weight and KV figures against llama.cpp's own log lines,
the offload/context searches, the RAM refusal, and the ``plan`` command."""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from runtime import memory
from runtime.gguf import GGUFFile
from runtime.memory import GiB, MiB


# --------------------------------------------------------------------------
# helpers


def _write_synthetic(path, arch: str, smollm2_path, *, n_layers=3, d=256, n_heads=4, n_kv=2,
                     head_dim=64, ffn=768, tied=False):
    """A qwen2/qwen3 GGUF with llama.cpp-style mixed k-quant types.

    All tensor bytes are zeros: planning (and llama.cpp's buffer accounting)
    only needs their types and shapes.  The tokenizer comes from SmolLM2 so
    llama.cpp accepts the file.
    """
    import gguf
    from gguf import GGMLQuantizationType as T

    src = GGUFFile(smollm2_path, header_only=True)
    tokens = src.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(np.asarray(src.get("tokenizer.ggml.token_type"), dtype=np.int32).tolist())
    w.add_token_merges(src.get("tokenizer.ggml.merges"))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    src.close()

    infos = []

    def quant(name, n_cols, n_rows, t):
        block, size = gguf.GGML_QUANT_SIZES[t]
        infos.append((name, (n_rows, n_cols // block * size), np.uint8, n_rows * n_cols // block * size, t))

    def f32(name, n):
        infos.append((name, (n,), np.float32, 4 * n, None))

    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    quant("token_embd.weight", d, n_vocab, T.Q4_K)
    f32("output_norm.weight", d)
    if not tied:
        quant("output.weight", d, n_vocab, T.Q6_K)
    for il in range(n_layers):
        # Like a Q4_K_M mix: some layers get Q6_K for attn_v / ffn_down.
        hi = T.Q6_K if il % 2 == 0 else T.Q4_K
        p = f"blk.{il}."
        f32(p + "attn_norm.weight", d)
        quant(p + "attn_q.weight", d, q_dim, T.Q4_K)
        quant(p + "attn_k.weight", d, kv_dim, T.Q4_K)
        quant(p + "attn_v.weight", d, kv_dim, hi)
        if arch == "qwen2":
            f32(p + "attn_q.bias", q_dim)
            f32(p + "attn_k.bias", kv_dim)
            f32(p + "attn_v.bias", kv_dim)
        else:
            f32(p + "attn_q_norm.weight", head_dim)
            f32(p + "attn_k_norm.weight", head_dim)
        quant(p + "attn_output.weight", q_dim, d, T.Q4_K)
        f32(p + "ffn_norm.weight", d)
        quant(p + "ffn_gate.weight", d, ffn, T.Q4_K)
        quant(p + "ffn_up.weight", d, ffn, T.Q4_K)
        quant(p + "ffn_down.weight", ffn, d, hi)
    for name, shape, dtype, nbytes, t in infos:
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=t)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # The data: all zeros, written as a sparse file (instant, even at ~1 GB).
    fout = w.fout[0]
    pad = lambda n: -(-n // 32) * 32  # noqa: E731
    fout.truncate(pad(fout.tell()) + sum(pad(i[3]) for i in infos))
    w.close()
    return path


@pytest.fixture(scope="session")
def qwen2_path(tmp_path_factory, smollm2_path):
    return _write_synthetic(tmp_path_factory.mktemp("mem") / "qwen2.gguf", "qwen2", smollm2_path)


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory, smollm2_path):
    return _write_synthetic(tmp_path_factory.mktemp("mem") / "qwen3.gguf", "qwen3", smollm2_path,
                            n_heads=4, n_kv=2, head_dim=128, tied=True)


def _open(path):
    g = GGUFFile(path, header_only=True)
    arch = memory.arch_from_gguf(g)
    return g, arch, memory.weights_from_gguf(g, arch)


@contextlib.contextmanager
def _llama_log(llama_cpp):
    """Collect llama.cpp's log lines into the yielded list; its own logger afterwards."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def llama_cpp_log(llama_cpp, path, **kw) -> dict:
    """Load ``path`` in llama.cpp and parse its buffer-size log lines (MiB)."""
    with _llama_log(llama_cpp) as lines:
        llm = llama_cpp.Llama(model_path=str(path), n_threads=1, verbose=False, **kw)
        llm.close()
    text = "".join(lines)

    def all_of(pattern):
        return [float(x) for x in re.findall(pattern, text)]

    caches = re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers", text)
    return {
        "model": all_of(r"CPU_Mapped model buffer size =\s*([\d.]+) MiB"),
        "kv": all_of(r"CPU KV buffer size =\s*([\d.]+) MiB"),
        "caches": [(float(s), int(c), int(n)) for s, c, n in caches],
        "compute": all_of(r"CPU compute buffer size =\s*([\d.]+) MiB"),
        "n_ctx": [int(x) for x in re.findall(r"llama_context: n_ctx\s+=\s*(\d+)", text)],
        "text": text,
    }


def _close(ours_bytes: int, theirs_mib: float, rel: float) -> bool:
    return abs(ours_bytes / MiB - theirs_mib) <= rel * theirs_mib


# --------------------------------------------------------------------------
# KV cache arithmetic


def test_kv_cache_bytes_per_type():
    # 2 (K and V) x layers x ctx x row bytes; q8_0 = 34 bytes per 32, q4_0 = 18 per 32.
    n_layers, kv, hd, ctx = 28, 2, 128, 4096
    row = kv * hd
    assert memory.kv_cache_bytes(n_layers, kv, hd, hd, ctx, "f16") == 2 * n_layers * ctx * row * 2
    assert memory.kv_cache_bytes(n_layers, kv, hd, hd, ctx, "q8_0") == 2 * n_layers * ctx * row // 32 * 34
    assert memory.kv_cache_bytes(n_layers, kv, hd, hd, ctx, "q4_0") == 2 * n_layers * ctx * row // 32 * 18
    # Different K and V head sizes, per-layer head counts (a layer without attention).
    assert memory.kv_cache_bytes(3, [2, 0, 4], 192, 128, 10, "f16") == 10 * 2 * (2 + 4) * (192 + 128)
    with pytest.raises(ValueError, match="multiple of 32"):
        memory.kv_cache_bytes(1, 1, 48, 48, 16, "q8_0")
    with pytest.raises(ValueError, match="unknown KV cache type"):
        memory.kv_cache_bytes(1, 1, 64, 64, 16, "q3_x")


def test_pad_ctx():
    assert [memory.pad_ctx(n) for n in (1, 256, 257, 500, 4096)] == [256, 256, 512, 512, 4096]


# --------------------------------------------------------------------------
# Against llama.cpp


@pytest.mark.parametrize("n_ctx,kv_type", [(512, "f16"), (2048, "f16"), (512, "q8_0"), (2048, "q8_0")])
def test_smollm2_matches_llama_cpp(llama_cpp, smollm2_path, n_ctx, kv_type):
    g, arch, w = _open(smollm2_path)
    q8 = kv_type == "q8_0"
    kw = dict(n_ctx=n_ctx, n_batch=512, flash_attn=q8)   # a quantized V cache needs flash attention
    if q8:
        kw.update(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0)
    log = llama_cpp_log(llama_cpp, smollm2_path, **kw)
    assert log["n_ctx"] == [memory.pad_ctx(n_ctx)]
    # On a CPU-only build every weight sits in one mapped buffer.
    assert len(log["model"]) == 1 and _close(w.total, log["model"][0], 0.01), (w.total / MiB, log["model"])
    p = memory.Planner(arch, w, kv_type=kv_type, n_ubatch=512, flash_attn=q8)
    kv = sum(p.kv_layers(memory.pad_ctx(n_ctx)))
    assert len(log["kv"]) == 1 and _close(kv, log["kv"][0], 0.01), (kv / MiB, log["kv"])
    assert kv == memory.kv_cache_bytes(arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.head_dim_v,
                                       memory.pad_ctx(n_ctx), kv_type)
    # The compute buffer is an estimate: within 5 % of llama.cpp's.
    comp = memory.compute_bytes(arch, memory.pad_ctx(n_ctx), min(512, n_ctx), flash_attn=q8)["peak"]
    assert _close(comp, log["compute"][0], 0.05), (comp / MiB, log["compute"])


def test_synthetic_qwen2_matches_llama_cpp(llama_cpp, qwen2_path):
    g, arch, w = _open(qwen2_path)
    assert not arch.tied and arch.n_kv_heads == 2
    for n_ctx in (512, 4096):
        log = llama_cpp_log(llama_cpp, qwen2_path, n_ctx=n_ctx, n_batch=512)
        assert _close(w.total, log["model"][0], 0.01), (w.total / MiB, log["model"])
        kv = sum(memory.Planner(arch, w, flash_attn=False).kv_layers(n_ctx))
        assert _close(kv, log["kv"][0], 0.01), (kv / MiB, log["kv"])
        comp = memory.compute_bytes(arch, n_ctx, 512, flash_attn=False)["peak"]
        assert _close(comp, log["compute"][0], 0.05), (comp / MiB, log["compute"])


@pytest.mark.parametrize("n_ctx", [4096, 32768])
@pytest.mark.parametrize("swa_full", [False, True])
def test_gemma3_sliding_window_cache_matches_llama_cpp(llama_cpp, gemma3_path, n_ctx, swa_full):
    """With swa_full off (llama-server's and llama-cli's default) llama.cpp gives the
    sliding-window layers a cache of n_swa + ubatch cells (padded to 256), with it
    on (the C API's default) n_ctx cells; the planner groups layers the same way
    and `plan --swa-full` chooses."""
    g, arch, w = _open(gemma3_path)
    log = llama_cpp_log(llama_cpp, gemma3_path, n_ctx=n_ctx, n_batch=512, swa_full=swa_full)
    assert ("using full-size SWA cache" in log["text"]) == swa_full
    p = memory.Planner(arch, w, n_ubatch=512, flash_attn=False, swa_full=swa_full)
    per_layer = p.kv_layers(n_ctx)
    glob = sum(b for b, swa in zip(per_layer, arch.swa_layers) if not swa)
    swa = sum(b for b, swa in zip(per_layer, arch.swa_layers) if swa)
    (g_mib, g_cells, g_layers), (s_mib, s_cells, s_layers) = log["caches"]
    assert g_cells == n_ctx and s_cells == (n_ctx if swa_full else memory.pad_ctx(arch.n_swa + 512))
    assert (g_layers, s_layers) == (sum(not s for s in arch.swa_layers), sum(arch.swa_layers))
    assert _close(glob, g_mib, 0.01) and _close(swa, s_mib, 0.01)
    assert _close(w.total, log["model"][0], 0.01)
    # the command: default off, --swa-full on; the same KV bytes as llama.cpp's two lines
    r = _cli(str(gemma3_path), "--ctx", str(n_ctx), "--json", *(["--swa-full"] if swa_full else []))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["swa_full"] == swa_full and d["swa_cells"] == s_cells and d["n_swa_layers"] == s_layers
    assert _close(d["kv_cache"]["total"], g_mib + s_mib, 0.01), (d["kv_cache"]["total"] / MiB, g_mib, s_mib)
    text = _cli(str(gemma3_path), "--ctx", str(n_ctx), *(["--swa-full"] if swa_full else []))
    assert f"15 sliding-window layers keep {s_cells} cells each" in text.stdout, text.stdout


# llama.cpp's CUDA log lines (MiB) for the file _write_synthetic makes with
# n_layers=28, d=1536, n_heads=12, n_kv=2, head_dim=128, ffn=8960, tied=True
# (Qwen2.5-1.5B's shape with SmolLM2's vocabulary), n_ctx 4096, ubatch 512.
# Recorded on an H100 with llama.cpp as vendored by llama-cpp-python 0.3.36,
# built with GGML_CUDA=ON (no CUDA build can run in CI, so they are data here).
# key: (n_gpu_layers, flash_attn) -> CUDA0 model, CPU_Mapped model, CUDA0 KV,
# CPU KV, CUDA0 compute, CUDA_Host compute.
CUDA_LOG = {
    (99, True): (792.63, 40.50, 112.00, 0.00, 99.00, 10.01),
    (99, False): (792.63, 40.50, 112.00, 0.00, 117.01, 15.01),
    (15, True): (416.57, 416.56, 56.00, 56.00, 102.00, 10.01),
    (15, False): (416.57, 416.56, 56.00, 56.00, 120.27, 15.01),
    (1, True): (40.51, 792.62, 0.00, 112.00, 99.00, 10.01),
    (0, True): (0.00, 792.62, 0.00, 112.00, 139.50, 10.01),
}


def test_gpu_split_matches_llama_cpp_cuda_log(tmp_path, smollm2_path):
    path = _write_synthetic(tmp_path / "q15.gguf", "qwen2", smollm2_path, n_layers=28, d=1536,
                            n_heads=12, n_kv=2, head_dim=128, ffn=8960, tied=True)
    g, arch, w = _open(path)
    for (ngl, fa), (gw, hw, gkv, hkv, gc, hc) in CUDA_LOG.items():
        s = memory.Planner(arch, w, n_ubatch=512, flash_attn=fa).split(4096, ngl)
        # Exact parts: within 1 % (0.02 MiB for the empty ones).
        for ours, theirs in ((s.gpu_weights, gw), (s.host_weights, hw), (s.gpu_kv, gkv), (s.host_kv, hkv)):
            assert abs(ours / MiB - theirs) <= max(0.02, 0.01 * theirs), (ngl, fa, ours / MiB, theirs)
        # Estimates: the GPU compute buffer within 5 %, the small host one within 10 %.
        assert _close(s.gpu_compute, gc, 0.05), (ngl, fa, s.gpu_compute / MiB, gc)
        assert _close(s.host_compute, hc, 0.10), (ngl, fa, s.host_compute / MiB, hc)
    # 32k context, everything offloaded: KV 896.00, CUDA0 compute 99.00, CUDA_Host 38.01.
    s = memory.Planner(arch, w, n_ubatch=512).split(32768, 99)
    assert (s.gpu_kv / MiB, s.host_kv) == (896.0, 0)
    assert _close(s.gpu_compute, 99.00, 0.05) and _close(s.host_compute, 38.01, 0.05)


# --------------------------------------------------------------------------
# Architecture mode


@pytest.mark.parametrize("which", ["smollm2", "qwen2", "qwen3"])
def test_arch_formula_counts_the_files_parameters(which, smollm2_path, qwen2_path, qwen3_path):
    """--arch mode builds the tensor list from the numbers alone; it must count
    exactly the parameters a real file of that architecture holds."""
    path = {"smollm2": smollm2_path, "qwen2": qwen2_path, "qwen3": qwen3_path}[which]
    g, arch, w = _open(path)
    arch.qkv_bias = "blk.0.attn_q.bias" in g.tensors
    arch.qk_norm = "blk.0.attn_q_norm.weight" in g.tensors
    n_file = sum(t.n_elements for t in g.tensors.values())
    assert memory.weights_from_arch(arch, 16.0).n_params == n_file == w.n_params
    # Scaling the file to 16 bits per weight gives F16 matrices plus F32 norms.
    n_1d = sum(t.n_elements for t in g.tensors.values() if len(t.dims) == 1)
    f16 = w.at_bpw(16.0).total
    assert f16 == 2 * (n_file - n_1d) + 4 * n_1d


def test_presets_parameter_counts():
    # Public parameter counts of the reference models (model cards).
    expect = {"Qwen2.5-0.5B": 0.49e9, "Qwen2.5-1.5B": 1.54e9, "Qwen2.5-3B": 3.09e9,
              "Qwen3-0.6B": 0.60e9, "Qwen3-4B": 4.02e9, "Llama-3.2-1B": 1.24e9,
              "Llama-3.2-3B": 3.21e9, "Llama-3.1-8B": 8.03e9}
    assert set(expect) == set(memory.PRESETS)
    for name, n in expect.items():
        got = memory.PRESETS[name].params()
        assert abs(got - n) / n < 0.01, (name, got)
    # llama.cpp's quantize README: Llama-3.1-8B at Q4_K_M is 4.58 GiB.
    w = memory.weights_from_arch(memory.PRESETS["Llama-3.1-8B"], memory.QUANT_BPW["Q4_K_M"])
    assert abs(w.total / GiB - 4.58) < 0.03


def test_parse_arch():
    arch, bpw = memory.parse_arch("layers=28,d=1536,heads=12,kv_heads=2,ffn=8960,vocab=151936,bpw=4.85,tied=1")
    assert (arch.n_layers, arch.d_model, arch.head_dim, arch.tied, bpw) == (28, 1536, 128, True, 4.85)
    assert memory.parse_arch("qwen3-4b")[0].head_dim == 128
    for bad in ("nonsense", "layers=2,d=64", "layers=2,d=64,heads=3,kv_heads=2,ffn=8,vocab=9",
                "layers=x,d=1", "layers=2,d=64,heads=4,kv_heads=2,ffn=8,vocab=9,foo=1"):
        with pytest.raises(ValueError):
            memory.parse_arch(bad)


def test_parse_size():
    assert memory.parse_size("4GiB") == 4 * GiB == memory.parse_size("4g") == memory.parse_size("4096MiB")
    assert memory.parse_size("4GB") == 4 * 10**9
    assert memory.parse_size("123456") == 123456
    for bad in ("", "4XB", "-1GiB", "GiB", "0"):
        with pytest.raises(ValueError):
            memory.parse_size(bad)


# --------------------------------------------------------------------------
# Planning answers


def test_offload_and_context_searches_are_tight():
    arch = memory.PRESETS["Llama-3.1-8B"]
    w = memory.weights_from_arch(arch, memory.QUANT_BPW["Q4_K_M"])
    p = memory.Planner(arch, w)
    vram = 4 * GiB
    ngl = p.max_gpu_layers(8192, vram)
    assert 0 < ngl <= arch.n_layers
    assert p.split(8192, ngl).gpu_total <= vram < p.split(8192, ngl + 1).gpu_total
    # Splits conserve the model: GPU + host weights = all weights (+ the tied copy).
    for k in (0, 1, ngl, arch.n_layers + 1):
        s = p.split(8192, k)
        assert s.gpu_weights + s.host_weights == w.total
        assert s.gpu_kv + s.host_kv == memory.kv_cache_bytes(32, 8, 128, 128, 8192)
    # A card large enough for the weights: the largest context is tight too.
    vram = 8 * GiB
    ctx = p.max_ctx(vram)
    assert ctx % 256 == 0
    full = arch.n_layers + 1
    assert p.split(ctx, full).gpu_total <= vram < p.split(ctx + 256, full).gpu_total


def test_plan_quant_table_is_ordered_by_size():
    arch = memory.PRESETS["Qwen2.5-3B"]
    r = memory.plan(arch, memory.weights_from_arch(arch, 4.89), vram=3 * GiB, n_ctx=8192)
    sizes = [q["weights"] for q in r["quants"]]
    assert sizes == sorted(sizes)
    fits = [q["fits"] for q in r["quants"]]
    assert fits[0] and not fits[-1]               # Q2_K fits 3 GiB, F16 does not
    assert fits == sorted(fits, reverse=True)     # once one does not fit, larger ones do not
    assert r["fits"] == (r["full_offload"]["gpu_total"] <= 3 * GiB)


# --------------------------------------------------------------------------
# The engine's RAM refusal


def test_check_host_memory_refuses_huge_context(smollm2_path):
    with GGUFFile(smollm2_path, header_only=True) as g:
        memory.check_host_memory(g, 512, available=10 * GiB)       # fits: no error
        with pytest.raises(ValueError) as e:
            memory.check_host_memory(g, 1 << 31)                    # ~45 TiB of KV cache
        msg = str(e.value)
        assert "context 2147483648" in msg and "KV cache" in msg and "available" in msg
        assert re.search(r"\d+\.\d+ (MiB|GiB)", msg)
        # The suggested context is the largest that passes.
        avail = 600 * MiB
        with pytest.raises(ValueError) as e:
            memory.check_host_memory(g, 1 << 20, available=avail)
        n = int(re.search(r"largest context that fits is (\d+)", str(e.value)).group(1))
        memory.check_host_memory(g, n, available=avail)
        with pytest.raises(ValueError):
            memory.check_host_memory(g, n + 1, available=avail)
        with pytest.raises(ValueError):
            memory.check_host_memory(g, 0)


# --------------------------------------------------------------------------
# Command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime", "plan", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_plan_text_and_json(smollm2_path):
    from runtime.cli import main

    r = _cli(str(smollm2_path), "--ctx", "2048", "--vram", "4GiB")
    assert r.returncode == 0, r.stderr
    assert "fits: yes" in r.stdout and "Q4_K_M" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", str(smollm2_path), "--ctx", "2048", "--vram", "100MiB", "--json"]) == 0
    d = json.loads(buf.getvalue())
    assert d["fits"] is False and d["vram"] == 100 * MiB
    assert d["weights"]["total"] == sum(d["weights"]["per_layer"]) + d["weights"]["input_host"] \
        + d["weights"]["output"] - d["weights"]["output_copy_of_embeddings"]
    assert d["full_offload"]["gpu_total"] > 100 * MiB
    assert len(d["quants"]) == len(memory.QUANT_BPW)


def test_cli_plan_on_partial_download(tmp_path, smollm2_path):
    """Only the header is needed: a file cut right after it plans the same."""
    with GGUFFile(smollm2_path, header_only=True) as g:
        head = g.data_offset + 1000
    part = tmp_path / "partial.gguf"
    with open(smollm2_path, "rb") as f:
        part.write_bytes(f.read(head))
    outs = [_cli(str(p), "--ctx", "4096", "--json") for p in (smollm2_path, part)]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    full, partial = (json.loads(r.stdout) for r in outs)
    for key in ("weights", "kv_cache", "full_offload", "max_gpu_layers", "max_ctx_full_offload", "quants"):
        assert full[key] == partial[key], key


def test_cli_plan_errors(tmp_path):
    (tmp_path / "not.gguf").write_bytes(b"this is not a model file")
    for args, needle in [
        ((str(tmp_path / "missing.gguf"),), "no such file"),
        (("--arch", "qwen3-4b", "--vram", "four gigs"), "bad size"),
        (("--arch", "layers=2"), "--arch"),
        ((), "--arch"),
        ((str(tmp_path / "not.gguf"),), "GGUF"),
        (("--arch", "qwen3-4b", "--ctx", "0"), "--ctx"),
        (("--arch", "qwen3-4b", "--batch", "0"), "--batch"),
        (("--arch", "qwen3-4b", "--kv-type", "q8_0", "--flash-attn", "off"), "flash attention"),
        (("--arch", "all"), "--table"),
    ]:
        r = _cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert err.startswith("error:") and "\n" not in err and needle in err, (args, err)
        assert "Traceback" not in r.stderr


def test_cli_readme_table():
    r = _cli("--arch", "all", "--table")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(memory.PRESETS)
    assert all(name in r.stdout for name in memory.PRESETS)


@pytest.mark.parametrize("n_parallel", [1, 4])
def test_parallel_slots_share_one_unified_cache_as_llama_cpp(llama_cpp, gemma3_path, n_parallel):
    """plan -np: llama-server's slots share one unified KV cache of --ctx cells, so the
    global layers' KV does not grow with -np, while each sliding-window layer keeps a
    window per slot (n_swa * np + ubatch cells); checked against the log lines of a
    llama.cpp context made with n_seq_max = np, kv_unified."""
    with _llama_log(llama_cpp) as lines:
        model = llama_cpp.llama_model_load_from_file(str(gemma3_path).encode(),
                                                     llama_cpp.llama_model_default_params())
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 4096, 512, 512, n_parallel
        cp.kv_unified, cp.swa_full, cp.n_threads = True, False, 1
        ctx = llama_cpp.llama_init_from_model(model, cp)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    caches = re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,", "".join(lines))
    (g_mib, g_cells), (s_mib, s_cells) = [(float(m), int(c)) for m, c in caches]
    r = _cli(str(gemma3_path), "--ctx", "4096", "-np", str(n_parallel), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n_parallel"] == n_parallel and d["n_ctx_slot"] == 4096 // n_parallel
    assert g_cells == 4096 and d["swa_cells"] == s_cells
    assert _close(d["kv_cache"]["total"], g_mib + s_mib, 0.01), (d["kv_cache"]["total"] / MiB, g_mib, s_mib)
    if n_parallel > 1:
        text = _cli(str(gemma3_path), "--ctx", "4096", "-np", str(n_parallel)).stdout
        assert f"-np {n_parallel}: one unified KV cache of 4096 cells" in text, text
    assert _cli(str(gemma3_path), "-np", "0").returncode == 1
