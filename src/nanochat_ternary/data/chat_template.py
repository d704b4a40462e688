"""The chat template: one definition used by sft, chat, serve and both exports.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``. Its tokens::

    <|endoftext|>                                    a new document (the data's separator)
    <|system|> content <|end|>                       optional, first
    <|user|> content <|end|>
    <|assistant|> content <|end|>                    the model's turn; <|end|> ends it
    ...
    <|assistant|>                                    the generation prompt (add_generation_prompt)

The role and end markers are special tokens appended to the tokenizer (:func:`add_chat_tokens`);
content is encoded as ordinary text, where a literal ``<|user|>`` is bytes, never a marker, so a user
cannot forge a turn. Training (sft) puts the loss on the assistant's content and its ``<|end|>``
only (:meth:`ChatTemplate.encode_with_mask`). :data:`JINJA` is the same template for transformers'
``apply_chat_template`` and llama.cpp's ``tokenizer.chat_template``; both build these exact ids
(tested token for token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import DataError
from .tokenizer import EOT, Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
CHAT_TOKENS = [ROLE_TOKENS["system"], ROLE_TOKENS["user"], ROLE_TOKENS["assistant"], END]

# For transformers (tokenizer_config.json "chat_template") and GGUF (tokenizer.chat_template). The
# bos_token is <|endoftext|>; the exports set it so.
JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

Message = Mapping[str, str]


def has_chat_tokens(tok: Tokenizer) -> bool:
    return all(tok.hf.token_to_id(t) is not None for t in CHAT_TOKENS)


def add_chat_tokens(tok: Tokenizer) -> Tokenizer:
    """``tok`` with the four chat markers added as special tokens (ids after the existing vocab, in
    :data:`CHAT_TOKENS` order). Idempotent: a tokenizer that has them is returned unchanged."""
    if not has_chat_tokens(tok):
        tok.hf.add_special_tokens([t for t in CHAT_TOKENS if tok.hf.token_to_id(t) is None])
        tok.hf.encode_special_tokens = True  # text stays text (see Tokenizer)
    return tok


def validate_messages(messages: object, where: str = "messages") -> list[dict[str, str]]:
    """A list of ``{"role", "content"}`` dicts with known roles and string content, or a one-line
    DataError naming ``where`` and the first bad message."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}[{i}].content: expected a string")
        out.append({"role": role, "content": content})
    return out


@dataclass
class ChatTemplate:
    """Encodes conversations for a tokenizer that has the chat tokens."""

    tok: Tokenizer

    def __post_init__(self) -> None:
        if not has_chat_tokens(self.tok):
            raise DataError("this tokenizer has no chat tokens: the model was not chat fine-tuned "
                            "(run nanochat-train sft first)")
        self.bos_id = self.tok.eot_id
        self.role_ids = {r: int(self.tok.hf.token_to_id(t)) for r, t in ROLE_TOKENS.items()}
        self.end_id = int(self.tok.hf.token_to_id(END))

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end the assistant's reply: its end of turn, or a new document."""
        return [self.end_id, self.bos_id]

    def encode_with_mask(self, messages: Sequence[Message],
                         add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """``(ids, trained)``: ``trained[i]`` is True where ``ids[i]`` is an assistant content token or
        the ``<|end|>`` closing an assistant turn (the tokens sft puts the loss on, as targets)."""
        ids, trained = [self.bos_id], [False]
        for m in validate_messages(messages):
            body = self.tok.encode(m["content"]) + [self.end_id]
            ids.append(self.role_ids[m["role"]])
            trained.append(False)
            ids.extend(body)
            trained.extend([m["role"] == "assistant"] * len(body))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            trained.append(False)
        return ids, trained

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids for a conversation (by default ending with ``<|assistant|>``, ready to generate)."""
        return self.encode_with_mask(messages, add_generation_prompt)[0]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as template text (what :data:`JINJA` renders), for display and exports."""
        text = EOT + "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in validate_messages(messages))
        return text + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")
