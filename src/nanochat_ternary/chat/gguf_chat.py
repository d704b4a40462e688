"""``chat --checkpoint model.gguf``: the same terminal on llama.cpp (:mod:`..checkpoint.llamacpp`).

:class:`GGUFChatTemplate` builds the prompt ids exactly as :class:`~..data.chat_template.ChatTemplate`
does, on the GGUF's own vocab: each marker is its one control token, content is tokenized as plain
text (a literal marker in content stays bytes, so a user cannot forge a turn). The GGUF also carries
the template as Jinja (``tokenizer.chat_template``) for llama.cpp's own chat; rendering it and
tokenizing with special tokens parsed gives these ids too, except for a marker typed in content
(tested in tests/test_llamacpp.py). Without llama.cpp installed this is one clear error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.llamacpp import LlamaCpp, open_gguf
from ..data.chat_template import CHAT_TOKENS, END, ROLE_TOKENS, Message, validate_messages
from ..data.tokenizer import EOT
from ..errors import UserError
from .session import ChatSession, prompt_budget
from .terminal import HELP, Terminal, _read_line


class GGUFChatTemplate:
    """ChatTemplate's ``encode`` / ``stop_ids`` on a GGUF (so :func:`~.session.fit_history` works on it)."""

    def __init__(self, llm: LlamaCpp) -> None:
        ids = {}
        for t in [*CHAT_TOKENS, EOT]:
            ids[t] = llm.special_id(t)
            if ids[t] is None:
                raise UserError(f"{llm.path}: its vocabulary has no {t} token: the model was not chat fine-tuned "
                                f"(run nanochat-train sft, then export)")
        self.llm = llm
        self.bos_id, self.end_id = int(ids[EOT]), int(ids[END])
        self.role_ids = {r: int(ids[t]) for r, t in ROLE_TOKENS.items()}

    @property
    def stop_ids(self) -> list[int]:
        return [self.end_id, self.bos_id]

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        ids = [self.bos_id]
        for m in validate_messages(messages):
            ids += [self.role_ids[m["role"]], *self.llm.tokenize(m["content"]), self.end_id]
        return ids + ([self.role_ids["assistant"]] if add_generation_prompt else [])

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids)


def gguf_terminal(args: Any, path: Path) -> int:
    if args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: a .gguf runs on llama.cpp's CPU backend here; use --device cpu")
    llm = open_gguf(path, threads=args.threads)
    template = GGUFChatTemplate(llm)
    n_ctx = llm.n_ctx
    budget = prompt_budget(n_ctx, min(args.max_tokens, n_ctx // 2))  # as the checkpoint chat (terminal.py)

    def reply(messages: list[dict[str, str]], n: int) -> Iterator[int]:
        ids = template.encode(messages)[-(n_ctx - 1):]  # a prompt over the context keeps its end, as ours
        return llm.generate(ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed + n, stop=template.stop_ids)

    term = Terminal(reply, template.decode, lambda s: s.fit(template, budget), ChatSession(system=args.system),
                    read_line=_read_line)
    term.note(f"chat with {path.name} on llama.cpp ({n_ctx}-token context, up to {args.max_tokens} per reply); {HELP}")
    return term.run()
