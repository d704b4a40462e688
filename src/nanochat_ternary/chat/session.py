"""A conversation with a model: its history, fitting it into the context window, and the reply.

Used by the terminal ``chat``; it and ``serve`` build prompts with the one template
(data/chat_template.py), so a model answers the same way everywhere.

Fitting the history (:func:`fit_history`, :func:`prompt_budget`) lives in data/chat_fit.py, below
both ``chat`` and ``serve`` in the layering, and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.chat_fit import fit_history, prompt_budget  # noqa: F401 (re-exported: chat's callers use them here)
from ..data.chat_template import ChatTemplate, Message, validate_messages
from ..generate import generate


def reply_tokens(opened: Any, template: ChatTemplate, messages: Sequence[Message], max_tokens: int,
                 temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95,
                 seed: int = 0) -> Iterator[int]:
    """The assistant's reply to ``messages`` as token ids, streamed; ends before ``<|end|>`` (or a
    new ``<|endoftext|>``), or after ``max_tokens``. ``opened`` is an
    :class:`~..checkpoint.open.OpenedModel` (anything with ``.model``). Fit the history first
    (:func:`fit_history` with :func:`prompt_budget`): a longer prompt loses its oldest tokens."""
    ids = template.encode(messages, add_generation_prompt=True)
    gen = generate(opened.model, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, stop_ids=template.stop_ids)
    while True:
        with torch.inference_mode():  # per token: the consumer's code between tokens runs outside it
            tok = next(gen, None)
        if tok is None:
            return
        yield tok


@dataclass
class ChatSession:
    """The history of one conversation: an optional system message and the turns after it."""

    system: str = ""
    turns: list[dict[str, str]] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation as the template takes it (system first, when set)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.turns)

    def add(self, role: str, content: str) -> None:
        self.turns.append(validate_messages([{"role": role, "content": content}])[0])

    def reset(self) -> None:
        """Forget the turns; the system message stays (``/system`` changes it)."""
        self.turns.clear()

    def set_system(self, text: str) -> None:
        self.system = text

    def fit(self, template: ChatTemplate, max_prompt_tokens: int) -> int:
        """Drop the oldest turns so the prompt fits (:func:`fit_history`); how many were dropped."""
        kept, dropped = fit_history(template, self.messages, max_prompt_tokens)
        if dropped:
            self.turns = kept[1:] if self.system else kept
        return dropped
