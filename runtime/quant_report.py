"""``python -m runtime quant-report MODEL_F16 FILE``: the quantization ladder, measured.

For one float model (F32 / F16 / BF16) and a text, every requested file type is
made by our quantizer (``runtime.quantize``, llama.cpp's bytes) and judged the
way llama.cpp's tools judge a quantization:

- size: the file's bytes, and bits per weight = 8 * (bytes of tensor data) /
  (parameters), llama.cpp's "model size" convention (the metadata - SmolLM2's
  vocabulary alone is about 1.5 MiB - is in the file size, not in bpw);
- perplexity on the text, llama-perplexity's method (``runtime.perplexity``:
  the same chunks, BOS handling and scored half);
- KL(base || quant) against the float model, with llama-perplexity's
  statistics (``KLStats``: mean KLD, percentiles, PPL ratio, same top p).

The base model runs once: its log-probabilities go into llama-perplexity's
``--kl-divergence-base`` file (``KLBaseWriter``), and each quantization is then
compared with that file (``kl_divergence_of_file``), exactly as
``perplexity --kl-divergence-base F.kld`` then ``perplexity Q.gguf
--kl-divergence-base F.kld --kl-divergence`` would.  So the base costs one
forward pass instead of one per type, at the price of the format's precision
(16-bit log-probs over the top 16 nats: a KL floor near 1e-6, see README) and of
disk, 2 bytes per vocabulary entry per scored token (checked before anything
runs).  A quantization's PPL is computed from its own logits on the file's
tokens, so it equals a plain ``perplexity`` run on that quantized file.

Quantized files go to a temporary directory, each deleted once measured, or
stay in ``keep_dir`` (with the base's log-prob file, reusable by
llama-perplexity).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["DEFAULT_TYPES", "QuantReportError", "QuantRecord", "quant_report", "format_report",
           "plot_report", "cli_quant_report"]

# The seed's quantization card, low to high: Q2_K "barely coherent" ... Q8_0 "basically FP16".
DEFAULT_TYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")

_FLOAT_TYPES = {"F32", "F16", "BF16"}
_MIB = 1024 * 1024


class QuantReportError(ValueError):
    """Bad input for a quantization report: unknown type, not a float model, missing file ..."""


@dataclass
class QuantRecord:
    """One row of the report: a file type, its size and its quality against the base."""
    type: str                   # file type: Q4_K_M ...; for the base its own (F16, BF16, F32)
    base: bool                  # the float model itself (the reference: no KL)
    path: str | None            # the file measured; None for a temporary file, deleted
    size_bytes: int             # the whole GGUF file
    tensor_bytes: int           # its tensors' data
    n_params: int
    tensor_types: dict          # ggml type name -> tensors of that type (the mix)
    ppl: float
    ppl_err: float
    n_ctx: int
    n_chunks: int
    n_scored: int
    kl: object = None           # perplexity.KLStats against the base's log-probs; None for the base
    quantize_seconds: float = 0.0
    eval_seconds: float = 0.0

    @property
    def size_mib(self) -> float:
        return self.size_bytes / _MIB

    @property
    def bpw(self) -> float:
        """Bits per weight of the tensor data (llama.cpp's model size / parameters)."""
        return 8 * self.tensor_bytes / self.n_params

    @property
    def file_bpw(self) -> float:
        """Bits per weight counting the whole file, metadata included."""
        return 8 * self.size_bytes / self.n_params

    def to_dict(self) -> dict:
        d = asdict(self)  # turns the KLStats dataclass into a dict too
        d.update(size_mib=self.size_mib, bpw=self.bpw, file_bpw=self.file_bpw)
        return d


# --------------------------------------------------------------------------
# checks, before anything long runs
# --------------------------------------------------------------------------

def _normalize_types(types: Sequence[str]) -> list[str]:
    """Canonical file type names (Q4_K -> Q4_K_M as llama-quantize reads them), each once."""
    from .quantize import QuantizeError, _ftype

    out: list[str] = []
    for t in types:
        t = str(t).strip()
        if not t:
            continue
        try:
            name = _ftype(t)[0]
        except QuantizeError as e:
            raise QuantReportError(str(e)) from None
        if name not in out:
            out.append(name)
    if not out:
        raise QuantReportError("no quantization types given")
    return out


def _float_model_facts(path: Path) -> tuple[str, int, int, dict]:
    """(its type name, tensor bytes, parameters, tensor type counts) of a float GGUF,
    or QuantReportError naming what makes it unusable as the reference."""
    from .gguf import GGUFError, GGUFFile

    if not path.is_file():
        raise QuantReportError(f"{path}: no such file")
    try:
        with GGUFFile(path, header_only=True) as g:
            tensors = list(g.tensors.values())
    except GGUFError as e:
        raise QuantReportError(str(e)) from None
    if not tensors:
        raise QuantReportError(f"{path} has no tensors")
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    quantized = sorted(set(counts) - _FLOAT_TYPES)
    if quantized:
        raise QuantReportError(f"{path} is not a float model (it has {', '.join(quantized)} tensors): "
                               f"quant-report needs the F32/F16/BF16 model the quantizations are made from")
    # The base's row is named after its matrices' type: F16 for an F16 file whose
    # norms are F32, as llama.cpp's file type names it.
    matrices = [t for t in tensors if len(t.dims) >= 2]
    kind = max(_FLOAT_TYPES, key=lambda k: sum(t.type_name == k for t in (matrices or tensors)))
    return kind, sum(t.nbytes for t in tensors), sum(t.n_elements for t in tensors), counts


def _estimated_file_bytes(path: Path, ftype: str) -> int:
    """What quantize_file will write: the header (as the input's) plus each tensor at its planned type."""
    from .gguf import GGUFFile
    from .quantize import _nbytes, plan

    with GGUFFile(path) as g:
        return g.data_offset + sum(_nbytes(g, p) + g.alignment for p in plan(g, ftype))


def _log_prob_file_bytes(n_ctx: int, n_chunks: int, n_vocab: int) -> int:
    from .perplexity import _HEADER, _scored_rows, record_width

    return _HEADER.size + 4 * n_ctx * n_chunks + 2 * n_chunks * _scored_rows(n_ctx) * record_width(n_vocab)


def _check_disk(work: Path, need: int) -> None:
    free = shutil.disk_usage(work).free
    if need > free:
        raise QuantReportError(f"the run needs about {need / 2**30:.2f} GiB in {work} (the base's log-probs and "
                               f"the quantized files), {free / 2**30:.2f} GiB are free: use fewer --chunks "
                               f"or a --keep-dir on a larger disk")


# --------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------

def _file_record(kind: str, base: bool, path: Path, kept: bool, tensor_bytes: int, n_params: int,
                 counts: dict, r, quantize_seconds: float, eval_seconds: float) -> QuantRecord:
    return QuantRecord(type=kind, base=base, path=str(path) if kept else None,
                       size_bytes=path.stat().st_size, tensor_bytes=tensor_bytes, n_params=n_params,
                       tensor_types=counts, ppl=r.ppl, ppl_err=r.ppl_err, n_ctx=r.n_ctx,
                       n_chunks=r.n_chunks, n_scored=r.n_scored, kl=r.kl,
                       quantize_seconds=quantize_seconds, eval_seconds=eval_seconds)


def quant_report(model_path, text_path, types: Sequence[str] = DEFAULT_TYPES, *, n_ctx: int = 512,
                 n_chunks: int = -1, keep_dir=None, imatrix=None, precision: str = "fast",
                 on_stage: Callable[[str], None] | None = None,
                 on_chunk: Callable | None = None) -> list[QuantRecord]:
    """Quantize the float model ``model_path`` to each of ``types`` and measure each on
    the text file ``text_path``: one QuantRecord for the base first, then one per type
    in the order given.  ``n_ctx`` / ``n_chunks``: perplexity's chunks (-1 = all).
    ``keep_dir``: where the quantized files and the base's log-prob file stay (created
    if missing); by default a temporary directory, removed afterwards.  ``imatrix``:
    passed to quantize_file.  ``on_stage(text)`` is told what starts, ``on_chunk``
    gets perplexity's ChunkStats.  Raises QuantReportError (a ValueError) for bad input."""
    from .model import Model
    from .perplexity import KLBaseFile, _check_output, chunk_count, kl_divergence_of_file, \
        perplexity_of_tokens, tokenize_for_perplexity
    from .quantize import load_imatrix, quantize_file

    model_path, text_path = Path(model_path), Path(text_path)
    names = _normalize_types(types)
    kind, base_bytes, n_params, base_counts = _float_model_facts(model_path)
    if not text_path.is_file():
        raise QuantReportError(f"{text_path}: no such file")
    if n_ctx < 4:
        raise QuantReportError(f"the context must be at least 4 tokens (got {n_ctx})")
    if n_chunks == 0 or n_chunks < -1:
        raise QuantReportError(f"the chunk count must be positive or -1 (got {n_chunks})")
    if imatrix is not None:
        imatrix = load_imatrix(imatrix)  # once, and before the long part: a bad file fails now
    stage = on_stage or (lambda s: None)

    if keep_dir is not None:
        work = Path(keep_dir)
        if work.exists() and not work.is_dir():
            raise QuantReportError(f"--keep-dir {work} exists and is not a directory")
        work.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        work = Path(tempfile.mkdtemp(prefix="quant-report-"))
        cleanup = work
    try:
        base = Model.load(model_path, n_ctx=n_ctx, precision=precision)
        text = text_path.read_text(encoding="utf-8", errors="replace")
        try:
            tokens = tokenize_for_perplexity(base, text)
            total = chunk_count(len(tokens), n_ctx, n_chunks)
        except ValueError as e:
            raise QuantReportError(f"{text_path}: {e}") from None
        del text
        kld_path = work / f"{model_path.stem}.kld"
        try:  # perplexity's rule: never over the model, the text or a file that is not a log-prob file
            _check_output(str(kld_path), model_path, text_path)
        except ValueError as e:
            raise QuantReportError(str(e)) from None
        plans = [_estimated_file_bytes(model_path, t) for t in names]
        need = _log_prob_file_bytes(n_ctx, total, base.n_vocab) + (sum(plans) if cleanup is None else max(plans))
        _check_disk(work, need)

        stage(f"{kind} (base): perplexity, log-probs into {kld_path.name}")
        t0 = time.perf_counter()
        r = perplexity_of_tokens(base, tokens, n_ctx=n_ctx, n_chunks=total, kl_base_out=kld_path,
                                 on_chunk=on_chunk)
        records = [_file_record(kind, True, model_path, True, base_bytes, n_params, base_counts, r, 0.0,
                                time.perf_counter() - t0)]
        del base, tokens
        base_file = KLBaseFile(kld_path)

        stem = model_path.stem
        for suffix in (".F16", ".f16", ".F32", ".f32", ".BF16", ".bf16", "-F16", "-f16"):
            stem = stem.removesuffix(suffix)
        for name in names:
            out = work / f"{stem}.{name}.gguf"
            stage(f"{name}: quantizing")
            t0 = time.perf_counter()
            q = quantize_file(model_path, out, name, imatrix=imatrix)
            t_quant = time.perf_counter() - t0
            counts = dict(sorted(q.type_counts().items()))
            stage(f"{name}: perplexity and KL against the base")
            t0 = time.perf_counter()
            model = Model.load(out, n_ctx=n_ctx, precision=precision)
            r = kl_divergence_of_file(model, base_file, n_chunks=total, on_chunk=on_chunk)
            del model
            records.append(_file_record(name, False, out, cleanup is None, q.bytes_out, q.n_elements, counts, r,
                                        t_quant, time.perf_counter() - t0))
            if cleanup is not None:
                out.unlink()  # one quantized file on disk at a time
        del base_file
        if cleanup is None:
            stage(f"kept in {work}: {', '.join(Path(x.path).name for x in records[1:])}, {kld_path.name} "
                  f"(llama-perplexity --kl-divergence-base format)")
        return records
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


# --------------------------------------------------------------------------
# table and plot
# --------------------------------------------------------------------------

def format_report(records: Sequence[QuantRecord]) -> str:
    """One table: a row per type, the base first (its KL columns empty)."""
    cols = (("type", 11, "<"), ("size MiB", 9, ">"), ("bpw", 6, ">"), ("PPL", 20, ">"),
            ("PPL/PPL(base)", 18, ">"), ("mean KLD", 22, ">"), ("99% KLD", 9, ">"), ("same top p", 17, ">"))

    def row(cells) -> str:
        return " ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols)).rstrip()

    lines = [row(c[0] for c in cols)]
    lines.append("-" * len(lines[0]))
    for x in records:
        cells = [f"{x.type} (base)" if x.base else x.type, f"{x.size_mib:.2f}", f"{x.bpw:.2f}", f"{x.ppl:.4f} +/- {x.ppl_err:.4f}"]
        k = x.kl
        if k is not None:
            cells += [f"{k.ppl_ratio:.4f} +/- {k.ppl_ratio_err:.4f}", f"{k.kl_mean:.6f} +/- {k.kl_err:.6f}",
                      f"{k.kl_p99:.5f}", f"{100 * k.top1:.2f} +/- {100 * k.top1_err:.2f} %"]
        lines.append(row(cells))
    return "\n".join(lines)


def plot_report(records: Sequence[QuantRecord], path, title: str = "") -> Path:
    """A PNG: perplexity against bits per weight (left, the base's as a dashed line)
    and mean KL divergence against bits per weight (right, log scale), a labelled
    point per type."""
    from .inspection_views import require_matplotlib

    plt = require_matplotlib()
    base = next((x for x in records if x.base), None)
    quants = [x for x in records if not x.base]
    fig, (ax_p, ax_k) = plt.subplots(1, 2, figsize=(11, 4.6))

    # A thin line through the points in bpw order: the ladder.
    ladder = sorted(quants, key=lambda x: x.bpw)
    ax_p.plot([x.bpw for x in ladder], [x.ppl for x in ladder], color="C0", linewidth=0.8, alpha=0.5)
    for x in ladder:
        ax_p.errorbar([x.bpw], [x.ppl], yerr=[x.ppl_err], fmt="o", color="C0", ecolor="0.65", capsize=3)
        ax_p.annotate(x.type, (x.bpw, x.ppl), textcoords="offset points", xytext=(6, 5), fontsize=9)
    if base is not None:
        ax_p.axhline(base.ppl, color="C3", linestyle="--", linewidth=1.6,
                     label=f"{base.type} (base, {base.bpw:.2f} bpw): {base.ppl:.3f}")
        ax_p.legend(loc="upper right", fontsize=9)
    ax_p.set_xlabel("bits per weight")
    ax_p.set_ylabel("perplexity (bars: standard error)")
    ax_p.set_title("perplexity")
    ax_p.grid(True, alpha=0.3)

    shown = [x for x in ladder if x.kl is not None and x.kl.kl_mean > 0]
    ax_k.plot([x.bpw for x in shown], [x.kl.kl_mean for x in shown], color="C2", linewidth=0.8, alpha=0.5)
    for x in shown:
        ax_k.errorbar([x.bpw], [x.kl.kl_mean], yerr=[x.kl.kl_err], fmt="s", color="C2", ecolor="0.65", capsize=3)
        ax_k.annotate(f"{x.type}  (same top-1 {100 * x.kl.top1:.1f}%)", (x.bpw, x.kl.kl_mean),
                      textcoords="offset points", xytext=(6, 5), fontsize=9)
    if shown:
        ax_k.set_yscale("log")
    ax_k.set_xlabel("bits per weight")
    ax_k.set_ylabel(f"mean KL({base.type if base else 'base'} || quant), nats")
    ax_k.set_title("KL divergence from the base (log scale)")
    ax_k.grid(True, which="major", alpha=0.3)

    # Labels to the right of the rightmost point need room.
    for ax in (ax_p, ax_k):
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.25 * (hi - lo))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def cli_quant_report(args) -> int:
    import json

    from .cli import CLIError
    from .perplexity import _Progress

    if args.plot:
        from .inspection_views import require_matplotlib

        require_matplotlib()  # before hours of work: a missing extra is a one-line error now
        if Path(args.plot).parent and not Path(args.plot).parent.is_dir():
            raise CLIError(f"--plot {args.plot}: no such directory {Path(args.plot).parent}")
    types = args.types.split(",") if args.types else list(DEFAULT_TYPES)
    progress = _Progress()

    def on_stage(s: str) -> None:
        print(f"quant-report: {s}", file=sys.stderr, flush=True)

    try:
        records = quant_report(args.model, args.file, types, n_ctx=args.ctx or 512, n_chunks=args.chunks,
                               keep_dir=args.keep_dir, imatrix=args.imatrix, precision=args.precision,
                               on_stage=on_stage, on_chunk=progress.update)
    except QuantReportError as e:
        raise CLIError(str(e)) from None
    base = records[0]
    title = (f"{Path(args.model).name} on {Path(args.file).name}: {base.n_chunks} chunks of {base.n_ctx} "
             f"({base.n_scored} scored tokens), precision {args.precision}")
    if args.plot:
        plot_report(records, args.plot, title=title)
    if args.json:
        print(json.dumps({"model": str(args.model), "file": str(args.file), "n_ctx": base.n_ctx,
                          "n_chunks": base.n_chunks, "n_scored": base.n_scored, "precision": args.precision,
                          "plot": str(args.plot) if args.plot else None,
                          "results": [x.to_dict() for x in records]}, indent=2))
    else:
        print(title)
        print(format_report(records))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
