"""Reasoning models' ``<think> ... </think>``: split out of a streamed reply.

Used by the server (``reasoning_content`` beside ``content``, llama-server's
``--reasoning-format deepseek``) and by ``chat`` (thinking shown dimmed, or hidden).
"""

from __future__ import annotations

__all__ = ["ReasoningSplitter", "starts_thinking"]


def starts_thinking(prompt_text: str) -> bool:
    """Does the rendered prompt leave the model inside a ``<think>`` block?  The
    DeepSeek-R1 distills' generation prompt ends with ``<think>\\n``, so their
    output begins with the reasoning and no opening tag."""
    return prompt_text.rstrip().endswith(ReasoningSplitter.OPEN)


class ReasoningSplitter:
    """Splits a reasoning model's ``<think> ... </think>`` out of the streamed reply
    (llama-server's ``--reasoning-format deepseek``): ``feed(text)`` returns
    ``(reasoning, content)`` pieces.  A tag split across deltas is held back until it
    is complete.  ``<think>`` opens a block only at the start of the reply (after
    whitespace); ``thinking=True`` starts inside one, for templates whose generation
    prompt already opened it (the DeepSeek-R1 distills)."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self.at_start = True        # nothing but whitespace in the content so far
        self.after_close = False    # strip the whitespace that follows </think>
        self.buf = ""

    @staticmethod
    def _partial(text: str, tag: str) -> int:
        for k in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:k]):
                return k
        return 0

    def _content(self, text: str, out: list) -> None:
        if self.after_close:
            text = text.lstrip()
            if not text:
                return
            self.after_close = False
        if text.strip():
            self.at_start = False
        out.append(text)

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while self.buf:
            if self.thinking:
                i = self.buf.find(self.CLOSE)
                if i >= 0:
                    reasoning.append(self.buf[:i])
                    self.buf = self.buf[i + len(self.CLOSE):]
                    self.thinking, self.after_close, self.at_start = False, True, False
                    continue
                k = self._partial(self.buf, self.CLOSE)
                reasoning.append(self.buf[:len(self.buf) - k])
                self.buf = self.buf[len(self.buf) - k:]
                break
            if not self.at_start:
                self._content(self.buf, content)
                self.buf = ""
                break
            stripped = self.buf.lstrip()
            if stripped.startswith(self.OPEN):
                self.buf = stripped[len(self.OPEN):]
                self.thinking = True
                continue
            if stripped and self.OPEN.startswith(stripped):
                break                   # maybe the start of <think>: wait for more
            self._content(self.buf, content)
            self.buf = ""
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        text, self.buf = self.buf, ""
        if self.thinking:
            return text, ""
        out: list[str] = []
        self._content(text, out)
        return "", "".join(out)

