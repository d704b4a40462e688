"""Does a model follow the chat format? The share of held-out conversations where its reply ends
with ``<|end|>`` after at least one token (the turn answered and closed, as sft teaches) rather
than running on or starting a new document.

Each conversation is cut before its last assistant message; the model replies greedily (temperature
0, so the figure is a property of the weights, not of a seed) for up to ``max_tokens``. Also
reported: exact answers (the reply equals the reference), meaningful for the arithmetic tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.chat_template import ChatTemplate
from ..generate import generate
from ..model.gpt import GPT


@dataclass
class FormatReport:
    n: int
    ended: int  # non-empty replies closed by <|end|>
    exact: int  # replies equal to the reference answer
    mean_reply_tokens: float

    @property
    def end_rate(self) -> float:
        return self.ended / max(1, self.n)

    @property
    def exact_rate(self) -> float:
        return self.exact / max(1, self.n)

    def line(self) -> str:
        return (f"{self.ended}/{self.n} replies answer and end their turn ({self.end_rate:.1%}), {self.exact} exact "
                f"({self.exact_rate:.1%}), {self.mean_reply_tokens:.1f} tokens per reply")


def reply_ends_turn(model: GPT, template: ChatTemplate, prompt: Sequence[dict[str, str]],
                    max_tokens: int) -> tuple[list[int], bool]:
    """The greedy reply's ids up to the first ``<|end|>`` / ``<|endoftext|>``, and whether it was ``<|end|>``."""
    out: list[int] = []
    with torch.inference_mode():
        for tok in generate(model, template.encode(prompt), max_tokens=max_tokens, temperature=0.0):
            if tok in (template.end_id, template.bos_id):
                return out, tok == template.end_id
            out.append(tok)
    return out, False


def format_following(model: GPT, template: ChatTemplate, conversations: Sequence[Sequence[dict[str, str]]],
                     max_tokens: int = 48) -> FormatReport:
    n = ended = exact = total = 0
    for conv in conversations:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        ids, closed = reply_ends_turn(model, template, conv[:last], max_tokens)
        n += 1
        ended += closed and bool(ids)  # an empty reply closes the turn without answering
        exact += closed and template.tok.decode(ids).strip() == conv[last]["content"].strip()
        total += len(ids)
    return FormatReport(n, ended, exact, total / max(1, n))
