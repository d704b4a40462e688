"""A conversation with a model: its history, fitting it into the context window, and the reply.

Shared by the terminal ``chat`` and ``serve``; both build prompts with the one template
(data/chat_template.py), so a model answers the same way everywhere.

Fitting the history: a prompt is ``template.encode(messages)`` (ending with ``<|assistant|>``) and
must leave room for the reply inside ``max_seq_len``. :func:`fit_history` drops the oldest
non-system messages until it fits, and then any assistant message left at the front (a reply
without its question reads as noise to the model). The system message and the newest message are
never dropped: if those alone do not fit, they are returned as they are and the caller decides
(``generate`` keeps the prompt's last ``max_seq_len - 1`` tokens; ``serve`` answers 400).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.chat_template import ChatTemplate, Message, validate_messages
from ..generate import generate


def prompt_budget(max_seq_len: int, max_tokens: int) -> int:
    """Tokens a prompt may take so that ``max_tokens`` of reply still fit in ``max_seq_len``
    (at least 1: a reply longer than the context is cut by ``generate``, not refused here)."""
    return max(1, max_seq_len - max(0, max_tokens))


def fit_history(template: ChatTemplate, messages: Sequence[Message],
                max_prompt_tokens: int) -> tuple[list[dict[str, str]], int]:
    """``(messages_kept, n_dropped)``: the newest messages whose prompt (with the generation
    prompt) takes at most ``max_prompt_tokens`` tokens; see the module docstring for what is kept."""
    if not messages:
        return [], 0
    msgs = validate_messages(messages)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system):]
    dropped = 0
    # encode each message once: the prompt length is BOS + the turns + <|assistant|>
    sizes = [len(template.encode([m], add_generation_prompt=False)) - 1 for m in rest]
    fixed = 2 + (len(template.encode(system, add_generation_prompt=False)) - 1 if system else 0)
    total = fixed + sum(sizes)
    while len(rest) > 1 and (total > max_prompt_tokens or rest[0]["role"] == "assistant"):
        total -= sizes.pop(0)
        rest.pop(0)
        dropped += 1
    return system + rest, dropped


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
