"""Fitting a conversation into the context window: drop the oldest turns so a reply still fits.

Shared by the terminal ``chat`` (chat/session.py) and ``serve`` (a request with ``"truncation":
"auto"``, or a server started with ``--truncation auto``); both build prompts with the one template
(data/chat_template.py).

A prompt is ``template.encode(messages)`` (ending with ``<|assistant|>``) and must leave room for the
reply inside ``max_seq_len``. :func:`fit_history` drops the oldest non-system messages until it
fits, and then any assistant message left at the front (a reply without its question reads as
noise to the model). The system message and the newest message are never dropped: if those alone
do not fit, they are returned as they are and the caller decides (``generate`` keeps the prompt's
last ``max_seq_len - 1`` tokens; ``serve`` answers 400 ``context_length_exceeded``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .chat_template import ChatTemplate, Message, validate_messages


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
