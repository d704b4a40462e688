"""``nanochat-train chat``: talk to a fine-tuned model in the terminal.

Replies stream token by token (whole UTF-8 characters, ``generate.stream_text``). The history is
kept within the context window: before each reply the oldest turns are dropped to leave room for
``--max-tokens`` (a note on stderr says how many). Commands: ``/reset`` (forget the turns),
``/system TEXT`` (set the system message; ``/system`` alone clears it), ``/quit``. Ctrl-C during a
reply stops it (the partial reply stays in the history) and returns to the prompt; Ctrl-C at the
prompt clears the line; end of input (Ctrl-D) exits 0.

Replies go to stdout, notes to stderr, so ``chat < questions.txt > answers.txt`` works.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ..checkpoint import open_checkpoint
from ..data.chat_template import ChatTemplate
from ..errors import UserError
from ..generate import stream_text
from .session import ChatSession, prompt_budget, reply_tokens

HELP = "commands: /reset  /system TEXT  /quit   (Ctrl-C stops a reply, Ctrl-D exits)"


def check_sampling_args(args: Any) -> None:
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature {args.temperature}: must be a finite number >= 0")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: must be >= 0 (0: torch's default)")


class Terminal:
    """The REPL over a reply function, with its input and outputs injectable (tests drive it)."""

    def __init__(self, reply: Callable[[list[dict[str, str]], int], Iterator[int]], decode: Callable[[list[int]], str],
                 fit: Callable[[ChatSession], int], session: ChatSession, read_line: Callable[[str], str] = input,
                 out: TextIO | None = None, err: TextIO | None = None) -> None:
        """``reply(messages, n)``: the ids of reply number ``n``; ``fit(session)``: trims it, returns
        how many messages it dropped."""
        self.reply, self.decode, self.fit, self.session, self.read_line = reply, decode, fit, session, read_line
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.n_replies = 0
        self.reply_prefix = "assistant> "

    def note(self, text: str) -> None:
        self.err.write(f"[{text}]\n")
        self.err.flush()

    def command(self, line: str) -> bool:
        """Handle a /command; False to quit."""
        cmd, _, rest = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.session.reset()
            self.note("history cleared")
        elif cmd == "/system":
            self.session.set_system(rest.strip())
            self.note(f"system message set: {rest.strip()!r}" if rest.strip() else "system message cleared")
        else:
            self.note(f"unknown command {cmd}; {HELP}")
        return True

    def turn(self, text: str) -> None:
        self.session.add("user", text)
        dropped = self.fit(self.session)
        if dropped:
            self.note(f"{dropped} oldest message(s) dropped to fit the context window")
        got: list[int] = []
        self.out.write(self.reply_prefix)
        self.out.flush()

        def tap() -> Iterator[int]:
            for tid in self.reply(self.session.messages, self.n_replies):
                got.append(tid)
                yield tid

        try:
            stream_text(tap(), self.decode, write=self.out.write, flush=self.out.flush)
            self.out.write("\n")
        except KeyboardInterrupt:
            self.out.write("\n")
            self.note("reply stopped")
        self.out.flush()
        self.n_replies += 1
        self.session.add("assistant", self.decode(got))

    def run(self) -> int:
        while True:
            try:
                line = self.read_line("you> ")
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.turn(line)


def _read_line(prompt: str) -> str:
    """``input``, with the prompt only on a terminal (``chat < questions.txt`` prints replies only)."""
    return input(prompt if sys.stdin.isatty() else "")


def run_chat(args: Any) -> int:
    check_sampling_args(args)
    path = Path(args.checkpoint)
    if path.suffix == ".gguf" and path.is_file():
        from .gguf_chat import gguf_terminal

        return gguf_terminal(args, path)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opened = open_checkpoint(path, device=args.device)
    template = ChatTemplate(opened.require_tokenizer())
    ctx = opened.config.model.max_seq_len
    # room kept for the reply: --max-tokens, but at most half the context (a longer reply is cut
    # where the context ends), so a long --max-tokens never empties the history
    budget = prompt_budget(ctx, min(args.max_tokens, ctx // 2))

    def reply(messages: list[dict[str, str]], n: int) -> Iterator[int]:
        return reply_tokens(opened, template, messages, args.max_tokens, args.temperature, args.top_k,
                            args.top_p, seed=args.seed + n)  # a new seed per reply, the same per session

    term = Terminal(reply, template.tok.decode, lambda s: s.fit(template, budget), ChatSession(system=args.system),
                    read_line=_read_line)
    term.note(f"chat with {opened.name} ({opened.config.model.max_seq_len}-token context, up to {args.max_tokens} "
              f"per reply); {HELP}")
    return term.run()

