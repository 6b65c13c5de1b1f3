"""Command line: ``python -m runtime <command>``.

Each subcommand's flags live in one ``_add_<command>`` function and its work in
the module named after the idea (``runtime.memory:cli_plan`` and so on), which
is imported only when that command runs.  Flags follow llama.cpp's spelling.
Errors reach the user as one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from pathlib import Path
import sys


class CLIError(Exception):
    """An error meant for the user: printed as one line, exit status 1."""


def _handler(target: str):
    """Defer importing the module that does the work (keeps --help fast)."""

    def run(args):
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite (float() accepts
    "nan" and "inf", and a NaN penalty silently turns every logit into NaN)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (llama.cpp names and defaults)")
    g.add_argument("--temp", type=finite_float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    g.add_argument("--top-p", type=finite_float, default=0.95, help="nucleus top-p, 1 = off (default 0.95)")
    g.add_argument("--min-p", type=finite_float, default=0.05, help="min-p, 0 = off (default 0.05)")
    g.add_argument("--repeat-penalty", type=finite_float, default=1.0, help="repetition penalty, 1 = off (default 1.0)")
    g.add_argument("--repeat-last-n", type=int, default=64, help="penalty window, -1 = context (default 64)")
    g.add_argument("--presence-penalty", type=finite_float, default=0.0, help="presence penalty (default 0)")
    g.add_argument("--frequency-penalty", type=finite_float, default=0.0, help="frequency penalty (default 0)")
    g.add_argument("--seed", type=int, default=-1, help="RNG seed, -1 = random (default -1)")


def _add_constraint_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (llama.cpp names; one of them)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("-j", "--json-schema", metavar="SCHEMA", default=None,
                   help="output must be JSON valid under this schema: JSON text, or @FILE")
    x.add_argument("--json-object", action="store_true", help="output must be a JSON object")
    x.add_argument("--grammar", metavar="TEXT", default=None,
                   help="output must match this GBNF grammar (or Lark, as llguidance reads it)")
    x.add_argument("--grammar-file", metavar="FILE", default=None, help="--grammar, read from FILE")


def _add_precision_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fast", choices=["fast", "exact"],
                   help="matmul activations: fast = rounded to integers as llama.cpp does (int8 at decode, "
                        "int16 in prefill; default); exact = float32 in every matmul (slower)")


def _add_model_flags(p: argparse.ArgumentParser, model_optional: bool = False) -> None:
    if model_optional:
        p.add_argument("model", nargs="?", default=None, help="GGUF path or registry name (default: smollm2-135m-instruct)")
    else:
        p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size (default: model's, capped at 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a GGUF model")
    p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_handler("runtime.info:cli_info"))


def _add_pull(sub) -> None:
    p = sub.add_parser("pull", help="download a registry model or a GGUF URL into models/")
    p.add_argument("name", nargs="?", default=None, help="registry name (see `pull --list`) or http(s) URL")
    p.add_argument("--list", action="store_true", help="list registry models")
    p.add_argument("--max-size", default=None,
                   help="largest file a URL may deliver: 64GiB, 500MB, bytes (default 64GiB, "
                        "registry.DEFAULT_MAX_SIZE); registry models are held to their listed size")
    p.set_defaults(func=_handler("runtime.registry:cli_pull"))


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_flags(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate, -1 = until EOS (default 128)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (content, finish_reason, timings) instead of streaming text")
    _add_precision_flag(p)
    _add_sampling_flags(p)
    _add_constraint_flags(p)
    p.set_defaults(func=_handler("runtime.generate:cli_generate"))


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (default SmolLM2-135M-Instruct)")
    _add_model_flags(p, model_optional=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("-n", "--n-predict", type=int, default=-1, help="max tokens per reply, -1 = until EOS")
    g = p.add_argument_group("reasoning models (<think> ... </think>)")
    g.add_argument("--reasoning-format", default="deepseek", choices=["deepseek", "none"],
                   help="deepseek: thinking shown apart from the answer, dimmed (default); none: left in the reply")
    g.add_argument("--hide-thinking", action="store_true", help="do not show the thinking, only the answer")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--think", dest="think", action="store_true", default=None,
                   help="enable_thinking=true for templates that read it (Qwen3)")
    t.add_argument("--no-think", dest="think", action="store_false",
                   help="enable_thinking=false: the template asks the model to answer without thinking")
    _add_precision_flag(p)
    _add_sampling_flags(p)
    _add_constraint_flags(p)
    p.set_defaults(func=_handler("runtime.chat:cli_chat"))


def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model on a text file (llama-perplexity method)")
    p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("file", nargs="?", default=None,
                   help="text file (with --kl-divergence: optional, checked against the file's tokens)")
    p.add_argument("--ctx", "-c", type=int, default=None,
                   help="tokens per chunk (default 512; with --kl-divergence the file's)")
    p.add_argument("--chunks", type=int, default=-1, help="max chunks, -1 = all")
    p.add_argument("--kl-base", default=None, help="base model to compare against, live (llama-perplexity's "
                   "KL table: KLD, PPL ratio, delta-p, same top p)")
    p.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                   help="llama-perplexity's log-prob file: written with the model's log-probs, or with "
                        "--kl-divergence read as the base")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare the model against the --kl-divergence-base file (its tokens, its chunks)")
    _add_precision_flag(p)
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads (with --ray: per worker, default 1 with a worker per CPU)")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("on a Ray cluster (the 'distributed' extra)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="score the chunks on Ray workers, results identical to a local run. ADDRESS as "
                        "ray.init takes it: auto, HOST:6379, ray://HOST:10001; none: auto when RAY_ADDRESS "
                        "is set, else a local Ray started for this run. Every node must reach the model by "
                        "this path (shared filesystem), or give a registry name: each node pulls it")
    g.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="Ray workers (default: as many as fit the cluster's CPUs at -t threads each)")
    p.set_defaults(func=_handler("runtime.perplexity:cli_perplexity"))


def _add_attention(sub) -> None:
    p = sub.add_parser("attention", help="inspect per-layer, per-head attention")
    p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("-p", "--prompt", required=True, help="text to run")
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--head", type=int, default=None)
    p.add_argument("--out", default=None, help="write page.html or heatmap.png")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.set_defaults(func=_handler("runtime.attention:cli_attention"))


def _add_lens(sub) -> None:
    p = sub.add_parser("lens", help="logit lens: what each layer's residual stream would predict")
    p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("-p", "--prompt", required=True, help="text to run")
    p.add_argument("--top", type=int, default=5, help="tokens per layer and position (default 5)")
    p.add_argument("--layers", nargs="+", default=None, metavar="L",
                   help="residual points to decode, e.g. 0,10,-1 (0 = embeddings, n_layers = the "
                        "last layer's output; negatives count from the end; default all)")
    p.add_argument("--out", default=None, help="write lens.html or lens.png")
    p.add_argument("--json", action="store_true", help="print the lens as one JSON object")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size (default: model's, capped at 4096)")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.set_defaults(func=_handler("runtime.inspection:cli_lens"))


def _add_surprise(sub) -> None:
    p = sub.add_parser("surprise", help="every token's probability, rank and entropy (per-token perplexity)")
    p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("file", nargs="?", default=None, help="text file (or -p TEXT)")
    p.add_argument("-p", "--prompt", default=None, help="text to score")
    p.add_argument("--kl-base", default=None,
                   help="another quantization of the model: per-token KL(base || model), as perplexity --kl-base")
    p.add_argument("--worst", type=int, default=10, help="rows in the list of the most surprising tokens (default 10)")
    p.add_argument("--out", default=None, help="write page.html or picture.png")
    p.add_argument("--json", action="store_true", help="print one JSON object, a row per token")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size (default: model's, capped at 4096); a longer text is scored in windows "
                        "of this many tokens every ctx/2 tokens (HF's strided perplexity), so each token "
                        "after the first window is predicted from at least ctx/2 tokens; --kl-base uses the "
                        "same windows")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.set_defaults(func=_handler("runtime.inspection:cli_surprise"))


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan GPU memory: will it fit, how many layers to offload")
    p.add_argument("model", nargs="?", default=None, help="GGUF path or registry name (or use --arch)")
    p.add_argument("--vram", default="4GiB", help="GPU memory: 4GiB, 4096MiB, 4g (binary), 4GB (10^9), bytes (default 4GiB)")
    p.add_argument("--ctx", "-c", type=int, default=None, help="context length (default: model's)")
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "q4_0"])
    p.add_argument("--batch", type=int, default=512, help="physical batch (llama.cpp's ubatch) the compute buffer is sized for (default 512)")
    p.add_argument("--flash-attn", default="on", choices=["on", "off"], help="flash attention, as llama.cpp's -fa (default on)")
    p.add_argument("--overhead", default=None, help="fixed GPU overhead: CUDA context, cuBLAS, pool (default 384MiB)")
    p.add_argument("--arch", default=None, help="plan from architecture numbers instead of a file: a preset "
                   "(Qwen2.5-0.5B ... Llama-3.1-8B), 'all' (with --table), or layers=28,d=1536,heads=12,"
                   "kv_heads=2,ffn=8960,vocab=151936,bpw=4.85[,head_dim=128][,tied=1]")
    p.add_argument("--table", action="store_true", help="markdown table of --arch models at Q4_K_M, 4k and 32k context")
    p.add_argument("-np", "--parallel", type=int, default=1, help="parallel slots (llama-server -np): --ctx is the "
                   "total of one unified KV cache, each slot holds ctx / np (default 1)")
    p.add_argument("--swa-full", action="store_true", help="sliding-window layers keep the whole context, as the "
                   "llama.cpp C API (llama-cpp-python) does; default: window + ubatch, as llama-server/-cli")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("runtime.memory:cli_plan"))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prompt processing and generation speed (like llama-bench)")
    p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--vs-llamacpp", action="store_true", help="also run llama.cpp and print the ratio")
    p.add_argument("--json", action="store_true")
    _add_precision_flag(p)
    p.set_defaults(func=_handler("runtime.bench:cli_bench"))


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (like llama-server)")
    p.add_argument("model", nargs="?", default=None, help="GGUF path or registry name (default: smollm2-135m-instruct)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="total context over all slots; each slot gets c / np (default: model's, capped at 4096)")
    p.add_argument("-np", "--parallel", type=int, default=4, help="slots: requests served at once (default 4)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port, printed)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set RUNTIME_API_KEY)")
    p.add_argument("--alias", default=None, help="model id reported by /v1/models (default: the file name)")
    p.add_argument("--system", default=None, help="system prompt for chats that send none")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503 (default 64)")
    p.add_argument("--cache-reuse", default="exact", choices=["exact", "prefix", "off"],
                   help="prompt cache: exact = only bit-identical chunks (batch invariant, default); "
                        "prefix = longest common prefix, as llama-server's cache_prompt; off")
    p.add_argument("--reasoning-format", default="deepseek", choices=["deepseek", "none"],
                   help="deepseek: <think> text goes to reasoning_content (default); none: left in content")
    p.add_argument("--verbose", action="store_true", help="uvicorn's info and access log")
    _add_precision_flag(p)
    _add_sampling_flags(p)
    p.set_defaults(func=_handler("runtime.server:cli_serve"))


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a GGUF file (llama.cpp's quantizer, byte for byte)")
    p.add_argument("input", metavar="IN.gguf", help="F32 / F16 / BF16 (or quantized) GGUF file")
    p.add_argument("output", metavar="OUT.gguf", help="file to write (never IN; appears only when complete)")
    p.add_argument("type", metavar="TYPE", help="Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S "
                   "Q4_K_M Q5_K_S Q5_K_M Q6_K IQ4_NL IQ4_XS F16 BF16 F32 (case-insensitive)")
    p.add_argument("--imatrix", metavar="FILE", default=None,
                   help="importance matrix (llama-imatrix's GGUF format) for the quantizers that take one")
    p.add_argument("--pure", action="store_true",
                   help="every matrix at TYPE's default type: no mix rules (row-length fallbacks still apply)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per tensor on stderr")
    p.set_defaults(func=_handler("runtime.quantize:cli_quantize"))


def _add_imatrix(sub) -> None:
    p = sub.add_parser("imatrix", help="importance matrix for quantize --imatrix (llama-imatrix's method and file)")
    p.add_argument("model", help="GGUF path or registry name")
    p.add_argument("file", metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", default="imatrix.gguf", help="file to write (default imatrix.gguf)")
    p.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=int, default=-1, help="evaluate at most N chunks (default: all)")
    p.add_argument("--process-output", action="store_true", help="also collect output.weight's inputs")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.set_defaults(func=_handler("runtime.imatrix:cli_imatrix"))


def _add_quant_report(sub) -> None:
    p = sub.add_parser("quant-report", help="quantize a float model to several types and measure each: "
                       "size, bits/weight, perplexity, KL against the float model (table, --json, --plot)")
    p.add_argument("model", metavar="MODEL_F16", help="F16 / BF16 / F32 GGUF file, the reference")
    p.add_argument("file", metavar="FILE", help="text file (as perplexity's)")
    p.add_argument("--types", default=None, help="comma-separated file types (default "
                   "Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K,Q8_0; any of quantize's)")
    p.add_argument("--ctx", "-c", type=int, default=None, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=-1, help="max chunks, -1 = all")
    p.add_argument("--keep-dir", metavar="DIR", default=None, help="keep the quantized files and the base's "
                   "log-prob file (llama-perplexity --kl-divergence-base format) in DIR (default: a temporary "
                   "directory, deleted)")
    p.add_argument("--imatrix", metavar="FILE", default=None, help="importance matrix for quantize")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="PNG: perplexity and mean KLD against bits per weight (matplotlib, the plots extra)")
    _add_precision_flag(p)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_handler("runtime.quant_report:cli_quant_report"))


COMMANDS = [_add_info, _add_pull, _add_chat, _add_generate, _add_perplexity,
            _add_attention, _add_lens, _add_surprise, _add_plan, _add_bench, _add_serve, _add_quantize,
            _add_imatrix, _add_quant_report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Local LLM inference for GGUF models (pure Python + numba).",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in COMMANDS:
        add(sub)
    return parser


# commands that run the engine's compiled kernels
_COMPUTING = {"generate", "chat", "perplexity", "attention", "bench", "serve", "lens", "surprise",
              "imatrix", "quant-report"}


def _jit_cache_warm() -> bool:
    """True when numba's cache for these sources (runtime/__init__.py names it after
    their hash) already holds the forward pass."""
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if not cache:
        import numba.core.config

        cache = numba.core.config.CACHE_DIR
    return bool(cache) and any(Path(cache).rglob("model.forward_layers-*.nbi"))


def _cpu_name() -> str:
    import numba.core.config
    from llvmlite import binding

    return numba.core.config.CPU_NAME or binding.get_host_cpu_name()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "threads", None):
        from .threads import set_threads

        set_threads(args.threads)
    if args.command in _COMPUTING:
        # numba compiles the engine on the first run and each format's kernels on
        # the first use of that format (then loads them from its cache in about a
        # second): say so rather than sit silent for half a minute.
        first = not _jit_cache_warm()
        if first:
            print(f"compiling kernels for this CPU ({_cpu_name()}), first run only: about 25 s on 2 cores, more for several formats ...",
                  file=sys.stderr, flush=True)
        else:
            from . import model, quant

            def notice(type_ids):
                names = ", ".join(quant.type_name(t) for t in type_ids)
                # generate has echoed the prompt by now: on a terminal, start a line of its own
                lead = "\n" if sys.stdout.isatty() and sys.stderr.isatty() else ""
                print(f"{lead}compiling the {names} kernels for this CPU, once: about 10 s per format on 2 cores ...",
                      file=sys.stderr, flush=True)

            model.COMPILE_NOTICE = notice
    try:
        rc = args.func(args)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `... | head`: the reader went away; not an error worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, ValueError, OSError, ImportError, RuntimeError) as e:
        if os.environ.get("RUNTIME_DEBUG"):
            raise
        msg = str(e) or e.__class__.__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except MemoryError as e:
        # Whatever asked for it (a huge model, a context too long for this
        # machine), the user gets one line, not a traceback.
        if os.environ.get("RUNTIME_DEBUG"):
            raise
        detail = f": {e}" if str(e) else ""
        print(f"error: out of memory{detail}", file=sys.stderr)
        return 1
