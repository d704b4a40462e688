"""``chat --checkpoint model.gguf``: the same terminal on llama.cpp (``llama-cpp-python``, optional).

The prompt ids are built exactly as :class:`~..data.chat_template.ChatTemplate` builds them: each
marker is its one control token of the GGUF's vocab, content is tokenized as plain text (a literal
marker in content stays bytes). Without ``llama_cpp`` installed this is one clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.chat_template import CHAT_TOKENS, END, ROLE_TOKENS, validate_messages
from ..data.tokenizer import EOT
from ..errors import UserError
from ..export.run import open_gguf
from .session import ChatSession
from .terminal import HELP, Terminal, _read_line


def gguf_terminal(args: Any, path: Path) -> int:
    if args.device not in ("auto", "cpu"):
        raise UserError(f"--device {args.device}: a .gguf runs on llama.cpp's CPU backend here; use --device cpu")
    llm = open_gguf(path, threads=args.threads)
    marker = {}
    for t in [*CHAT_TOKENS, EOT]:
        ids = llm.tokenize(t.encode(), add_bos=False, special=True)
        if len(ids) != 1:
            raise UserError(f"{path}: its vocabulary has no {t} token: the model was not chat fine-tuned "
                            f"(run nanochat-train sft, then export)")
        marker[t] = ids[0]

    def encode(messages: list[dict[str, str]]) -> list[int]:
        ids = [marker[EOT]]
        for m in validate_messages(messages):
            ids += [marker[ROLE_TOKENS[m["role"]]]]
            ids += llm.tokenize(m["content"].encode(), add_bos=False, special=False) + [marker[END]]
        return ids + [marker[ROLE_TOKENS["assistant"]]]

    n_ctx = llm.n_ctx()

    def fit(session: ChatSession) -> int:
        dropped = 0
        while len(session.turns) > 1 and (len(encode(session.messages)) > n_ctx - min(args.max_tokens, n_ctx // 2)
                                          or session.turns[0]["role"] == "assistant"):
            session.turns.pop(0)
            dropped += 1
        return dropped

    def reply(messages: list[dict[str, str]], n: int) -> Iterator[int]:
        ids = encode(messages)
        llm.set_seed(args.seed + n)
        budget = max(0, min(args.max_tokens, n_ctx - len(ids)))
        for i, t in enumerate(llm.generate(ids, top_k=args.top_k, top_p=args.top_p, temp=args.temperature,
                                           min_p=0.0, reset=True)):
            if i >= budget or t in (marker[END], marker[EOT]):
                return
            yield int(t)

    def decode(ids: list[int]) -> str:
        return llm.detokenize(ids).decode("utf-8", errors="replace")

    term = Terminal(reply, decode, fit, ChatSession(system=args.system), read_line=_read_line)
    term.note(f"chat with {path.name} on llama.cpp ({n_ctx}-token context); {HELP}")
    return term.run()
