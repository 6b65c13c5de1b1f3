"""A real GGUF model, written for the tests, whose greedy reply is a fixed script.

The reasoning tests need a model that thinks: emits ``<think>``, some reasoning,
``</think>`` (as one token, or split over several), then an answer, through the real
engine, tokenizer, scheduler and server.  Trained reasoning models are gigabytes, so
this one is built by hand as a bigram table:

* every layer's output projections (``attn_output``, ``ffn_down``) are zero, so the
  residual stream at a position is the embedding of that position's token alone and
  the logits depend on the current token only;
* each token of interest gets its own embedding direction ``e_k`` (every other token
  shares ``e_0``), and the output matrix maps direction ``k`` to a logit of 16 (after
  the final RMSNorm) for that token's successor, 0 for every other token.

So after a prompt ending in ``trigger`` (a newline: the end of ChatML's and the R1
distills' generation prompts) the model emits ``script[0]``, ``script[1]``, ...,
then EOS, whatever came before: probability 1 - 3e-5 per token even at temperature 1.

The vocabulary is GPT-2 style byte-level BPE (256 byte tokens), the chat templates'
control tokens (ChatML and DeepSeek-R1), ``<think>`` / ``</think>`` as user-defined
tokens (as Qwen3's GGUF has them: rendered as text, matched whole in prompts), and the
script's pieces as normal tokens (which no merge produces, so they occur only where
the model emits them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONTROL = ["<|im_start|>", "<|im_end|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
           "<｜User｜>", "<｜Assistant｜>"]
USER_DEFINED = ["<think>", "</think>"]
D_MODEL = 256
LOGIT = 1.0   # output weight; times the normed activation sqrt(D_MODEL) = 16


def _byte_chars() -> list[str]:
    from runtime.tokenizer import _BYTE_TO_CHAR  # GPT-2's byte -> printable character map

    return list(_BYTE_TO_CHAR)


def write_scripted(path, script: list[str], *, chat_template: str | None = None,
                   eos: str = "<|im_end|>", trigger: str = "\n") -> Path:
    """Write the model; ``script`` pieces are the texts of successive tokens (a
    CONTROL or USER_DEFINED text names that token; each piece once)."""
    import gguf

    if len(set(script)) != len(script):
        raise ValueError("each script piece may occur once (the successor of a token is unique)")
    bc = _byte_chars()

    def enc(text: str) -> str:
        return "".join(bc[b] for b in text.encode("utf-8"))

    tokens = [bc[b] for b in range(256)] + CONTROL + USER_DEFINED + ["Ġt"]
    types = [1] * 256 + [3] * len(CONTROL) + [4] * len(USER_DEFINED) + [1]
    merges = ["Ġ t"]  # the BPE loader needs one; " t" is a harmless merge
    index = {t: i for i, t in enumerate(tokens)}
    ids = []
    for piece in script:
        key = piece if piece in CONTROL or piece in USER_DEFINED else enc(piece)
        if key not in index:
            index[key] = len(tokens)
            tokens.append(key)
            types.append(1)
        ids.append(index[key])
    trigger_id = index[enc(trigger)]
    eos_id = index[eos]
    if trigger_id in ids:
        raise ValueError("the trigger token may not occur in the script")
    V = len(tokens)
    chain = [trigger_id] + ids              # chain[k] -> its successor
    succ = ids + [eos_id]
    if len(chain) >= D_MODEL:
        raise ValueError(f"a script of at most {D_MODEL - 2} tokens")
    emb = np.zeros((V, D_MODEL), np.float32)
    emb[:, 0] = 1.0                         # every other token: direction 0 -> EOS
    out = np.zeros((V, D_MODEL), np.float32)
    out[eos_id, 0] = LOGIT
    for k, (tok, nxt) in enumerate(zip(chain, succ), start=1):
        emb[tok] = 0.0
        emb[tok, k] = 1.0
        out[nxt, k] = LOGIT

    n_heads, head_dim, ffn = 4, 64, 256
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("scripted-bigram")
    w.add_block_count(1)
    w.add_context_length(4096)
    w.add_embedding_length(D_MODEL)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(index["<｜begin▁of▁sentence｜>"])
    w.add_eos_token_id(eos_id)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", emb)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(D_MODEL, np.float32))
    w.add_tensor("blk.0.attn_q.weight", zeros(n_heads * head_dim, D_MODEL))
    w.add_tensor("blk.0.attn_k.weight", zeros(n_heads * head_dim, D_MODEL))
    w.add_tensor("blk.0.attn_v.weight", zeros(n_heads * head_dim, D_MODEL))
    w.add_tensor("blk.0.attn_output.weight", zeros(D_MODEL, n_heads * head_dim))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(D_MODEL, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", zeros(ffn, D_MODEL))
    w.add_tensor("blk.0.ffn_up.weight", zeros(ffn, D_MODEL))
    w.add_tensor("blk.0.ffn_down.weight", zeros(D_MODEL, ffn))
    w.add_tensor("output_norm.weight", np.ones(D_MODEL, np.float32))
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
