"""Importance matrix: llama-imatrix's method and GGUF file, for ``quantize --imatrix``.

    python -m runtime imatrix MODEL FILE -o imatrix.gguf [-c 512] [--chunks N] [-t N]

The calibration text is tokenized as llama-imatrix does (BOS first when the model
adds one) and cut into whole chunks of n_ctx tokens, each evaluated from an empty
cache with BOS as its first token (llama-perplexity's chunking; at least two
chunks of text needed).  For every weight matrix of the blocks (attn_q/k/v,
attn_output, ffn_gate/up/down; output.weight only with ``--process-output``) it
sums, per input column j, x_j^2 over every token row x entering that matrix, and
counts the rows: the quantizers then weight column j's error by in_sum2 / count,
the mean squared activation (ggml's quantize_row_*_impl).

llama-imatrix skips a matmul whose batch has fewer than 16 rows (its collector's
``src1->ne[1] < 16`` test): with its default batch (2048 tokens, several chunks
per batch when they fit) split into ubatches of 512, the last ubatch of a batch
is dropped when it is that short; ``collected_rows`` reproduces which rows count.

The activations are this engine's own with float32 activations in every matmul
(``Model`` precision "exact", the path inspection uses), not rounded to 8 bits as
llama.cpp's CPU matmuls round them, so the sums differ from llama-imatrix's on the
same quantized model by that rounding's effect on the layers below.

File (llama-imatrix's GGUF format, read by runtime.quantize.load_imatrix):
general.type "imatrix", imatrix.datasets [text file], imatrix.chunk_count,
imatrix.chunk_size (n_ctx); per matrix NAME, ``NAME.in_sum2`` F32 [cols, 1] and
``NAME.counts`` F32 [1, 1], tensors sorted by name.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["ImatrixError", "ImatrixResult", "N_BATCH", "N_UBATCH", "MIN_ROWS", "collected_rows",
           "compute_imatrix", "write_imatrix", "cli_imatrix"]

# llama-imatrix's defaults: tokens per llama_decode call, per compute graph, and the
# smallest graph batch its collector looks at.
N_BATCH = 2048
N_UBATCH = 512
MIN_ROWS = 16

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class ImatrixError(ValueError):
    """Bad input to imatrix (too little text, a bad context size, an unwritable file...)."""


@dataclass
class ImatrixResult:
    sums: dict                  # matrix name -> float64 [cols]: sum of x_j^2 over counted rows
    counts: dict                # matrix name -> rows counted
    n_ctx: int
    n_chunks: int               # chunks evaluated
    chunk_count: int            # what the file records: max count // n_ctx (llama-imatrix's m_last_chunk)
    n_tokens: int               # tokens in the whole text
    datasets: list = field(default_factory=list)
    seconds: float = 0.0

    def values(self) -> dict:
        """Mean squared activation per column (what load_imatrix gives quantize)."""
        return {k: (s / max(self.counts[k], 1)).astype(np.float32) for k, s in self.sums.items()}


def collected_rows(n_ctx: int, n_chunks: int, n_batch: int = N_BATCH, n_ubatch: int = N_UBATCH) -> np.ndarray:
    """bool [n_chunks, n_ctx]: the rows llama-imatrix's collector sees.  Its loop
    decodes n_seq = max(1, n_batch // n_ctx) chunks per call (batches of
    min(n_batch, n_ctx) tokens per chunk when a chunk is longer); llama.cpp splits
    each call's tokens, in order, into ubatches of n_ubatch, and the collector
    ignores a ubatch of fewer than MIN_ROWS rows.  (The in-order split is exact for
    one chunk per call; where several chunks share a call, llama.cpp's split of
    their sequences is assumed in order too.  At the default n_ctx 512 every row
    counts either way.)"""
    keep = np.ones((n_chunks, n_ctx), bool)
    n_seq = max(1, n_batch // n_ctx)
    step = min(n_batch, n_ctx)
    flat = keep.reshape(-1)
    for i in range(0, n_chunks, n_seq):
        group = min(n_seq, n_chunks - i)
        for j in range(0, n_ctx, step):
            size = min(step, n_ctx - j)
            # the call's rows: chunk i + s's rows j .. j + size - 1, s = 0 .. group - 1
            rows = [(i + s) * n_ctx + j + k for s in range(group) for k in range(size)]
            tail = len(rows) % n_ubatch
            if 0 < tail < MIN_ROWS:
                flat[rows[len(rows) - tail:]] = False
    return keep


def compute_imatrix(model, tokens, n_ctx: int, n_chunks: int = -1, *, process_output: bool = False,
                    datasets=(), on_chunk=None) -> ImatrixResult:
    """llama-imatrix over a token stream (BOS included if the model adds one)."""
    from .imatrix_kernels import forward_sq
    from .model import N_BATCH as STEP, WD, WG, WO, WQ
    from .ops import rms_norm
    from .perplexity import _check_bos, chunk_count

    if n_ctx < MIN_ROWS:
        raise ImatrixError(f"ctx must be at least {MIN_ROWS}: llama-imatrix ignores batches of fewer rows "
                           f"(got {n_ctx})")
    if n_ctx > model.n_ctx:
        raise ImatrixError(f"ctx {n_ctx} exceeds the model's context of {model.n_ctx} tokens")
    if n_chunks is not None and (n_chunks == 0 or n_chunks < -1):
        raise ImatrixError(f"chunks must be positive (or -1: all), got {n_chunks}")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    try:
        total = chunk_count(len(tokens), n_ctx, n_chunks)
    except ValueError as e:
        raise ImatrixError(str(e)) from None
    add_bos = _check_bos(model)
    bos = model.tokenizer.bos_id if add_bos else None
    a = model.args
    ffn = [a.ffn(l) for l in range(a.n_layers)]
    cols = max(a.d_model, a.n_heads * a.head_dim_v, *ffn)
    sq = np.zeros((a.n_layers, 7, cols), np.float64)
    out_sq = np.zeros(a.d_model, np.float64)
    keep_all = collected_rows(n_ctx, total)
    kv = model.session(n_ctx=n_ctx, swa_full=True).kv
    t0 = time.perf_counter()
    for c in range(total):
        ids = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
        if bos is not None:
            ids[0] = bos
        x_all = model.embed_tokens(ids)
        for s in range(0, n_ctx, STEP):  # the cache is filled from position 0 of each chunk
            x = np.ascontiguousarray(x_all[s:s + STEP])
            pos = np.arange(s, s + x.shape[0], dtype=np.int64)
            keep = np.ascontiguousarray(keep_all[c, s:s + x.shape[0]])
            forward_sq(x, pos, s, model.weights, model.config, kv, model.inv_freq, keep, sq)
            if process_output and keep.any():
                hn = np.empty_like(x)
                rms_norm(x, model.output_norm, model.config.eps, hn)
                h64 = hn[keep].astype(np.float64)
                out_sq += (h64 * h64).sum(axis=0)
        if on_chunk is not None:
            on_chunk(c + 1, total, time.perf_counter() - t0)
    rows = int(keep_all.sum())
    sums, counts = {}, {}
    for l in range(a.n_layers):
        d_att = a.n_heads * a.head_dim_v
        for name, slot, n in (("attn_q", WQ, a.d_model), ("attn_k", WQ, a.d_model), ("attn_v", WQ, a.d_model),
                              ("attn_output", WO, d_att), ("ffn_gate", WG, a.d_model),
                              ("ffn_up", WG, a.d_model), ("ffn_down", WD, ffn[l])):
            key = f"blk.{l}.{name}.weight"
            sums[key] = sq[l, slot, :n].copy()
            counts[key] = rows
    if process_output:
        # llama-imatrix matches the name "output.weight" only: a tied output
        # (token_embd.weight doing both jobs) gets no entry, as there.
        if "output.weight" in model.gguf.tensors:
            sums["output.weight"] = out_sq
            counts["output.weight"] = rows
    return ImatrixResult(sums, counts, n_ctx, total, rows // n_ctx, len(tokens), list(datasets),
                         time.perf_counter() - t0)


def worst_difference(ours: dict, theirs: dict) -> tuple[tuple[float, str], tuple[float, str]]:
    """Two imatrices' largest difference over the matrices of `theirs` (name -> sums
    of squares per column; ".counts" entries skipped): ((plain relative, matrix),
    (relative to the larger of the column's sum and the matrix's mean column sum,
    matrix)).  The scaled form: a column whose activations are all tiny carries its
    neighbours' absolute error."""
    plain = scaled = (0.0, "")
    for name in sorted(theirs):
        if name.endswith(".counts"):
            continue
        a, b = ours[name], theirs[name]
        plain = max(plain, (float(np.max(np.abs(a - b) / np.abs(b))), name))
        scaled = max(scaled, (float(np.max(np.abs(a - b) / np.maximum(np.abs(b), b.mean()))), name))
    return plain, scaled


def write_imatrix(result: ImatrixResult, path) -> Path:
    """llama-imatrix's GGUF file, written atomically (a temporary file, then rename)."""
    import gguf

    path = Path(path)
    if path.is_dir():
        raise ImatrixError(f"{path}: is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "")
        # gguf-py always adds general.architecture; llama-imatrix's files have none.
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [str(d) for d in result.datasets])
        w.add_uint32("imatrix.chunk_count", int(result.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(result.n_ctx))
        for name in sorted(result.sums):
            # numpy (n_mat, cols) is GGUF [cols, n_mat]; one matrix per dense weight
            w.add_tensor(f"{name}.in_sum2", result.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[result.counts[name]]], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cli_imatrix(args) -> int:
    import sys

    from .model import Model
    from .perplexity import tokenize_for_perplexity

    text_path = Path(args.file)
    if not text_path.is_file():
        raise ImatrixError(f"{text_path}: no such text file")
    out = Path(args.output)
    if out.exists() and Path(args.model).exists() and out.resolve() == Path(args.model).resolve():
        raise ImatrixError(f"refusing to overwrite the model {args.model} with the imatrix")
    n_ctx = int(args.ctx_size)
    model = Model.load(args.model, n_ctx=max(n_ctx, 1), precision="exact")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    tokens = tokenize_for_perplexity(model, text)

    def progress(i, n, secs):
        print(f"\rchunk {i}/{n} ({secs:.1f} s)", end="" if i < n else "\n", file=sys.stderr, flush=True)

    r = compute_imatrix(model, tokens, n_ctx, args.chunks, process_output=args.process_output,
                        datasets=[args.file], on_chunk=progress)
    write_imatrix(r, out)
    print(f"{out}: {len(r.sums)} matrices, {r.n_chunks} chunks of {n_ctx} tokens "
          f"({r.n_tokens} tokens in {text_path.name}), {r.seconds:.1f} s")
    return 0
