"""What the routes call: requests -> prompt ids -> an engine job -> text, streamed or whole.

The prompt must leave room in the context: a prompt of ``P`` tokens in a context of ``C`` allows
``max_tokens <= C - P`` (default: all of it); more is a 400 ``context_length_exceeded``, as OpenAI
answers, never a silent truncation. A chat request with ``"truncation": "auto"`` (or every chat
request of a server started with ``--truncation auto``) instead drops its oldest turns until
``max_tokens`` (not given: half the context, as ``chat`` caps a reply) fits, with the terminal
chat's rule (data/chat_fit.py); the response header ``X-Truncated-Messages`` says how many went.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..data.chat_fit import fit_history, prompt_budget
from ..data.chat_template import ROLE_TOKENS, ChatTemplate, has_chat_tokens
from ..data.tokenizer import Tokenizer
from .engine import Busy, Engine, Event, Job
from .protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    _Sampling,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    usage_chunk,
)
from .text import TextStream

_AUTO_HINT = ' (or send "truncation": "auto" to drop the oldest turns)'


class GenerationFailed(Exception):
    pass


class Mailbox:
    """Events from the decode thread to the event loop's queues, delivered in batches.

    ``call_soon_threadsafe`` per token writes to the loop's self-pipe and wakes the loop once per
    token, and each wake-up hands the GIL to the loop thread while the decode thread waits for it.
    Here the worker wakes the loop only when no delivery is armed: the loop delivers everything
    posted so far, then (``interval > 0``) looks again ``interval`` seconds later on its own timer and
    stays armed while events keep coming. So a busy server wakes its loop once per interval, not
    once per token, and a stream sends the tokens of an interval as one chunk; the first event
    after a quiet spell is delivered at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0) -> None:
        self.loop, self.interval = loop, interval
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []
        self._armed = False  # a delivery is scheduled (or the interval's timer runs)

    def post(self, queue: asyncio.Queue, ev: Event) -> None:
        """Called on the worker thread; raises RuntimeError when the loop is closed."""
        with self._lock:
            self._pending.append((queue, ev))
            if self._armed:
                return
            self._armed = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nothing will deliver
            with self._lock:
                self._pending.clear()
                self._armed = False
            raise

    def _deliver(self) -> None:  # on the loop
        with self._lock:
            items, self._pending = self._pending, []
            if not items or self.interval <= 0:
                self._armed = False  # the next post wakes the loop again
        for queue, ev in items:
            queue.put_nowait(ev)
        if items and self.interval > 0:
            self.loop.call_later(self.interval, self._deliver)


@dataclass
class Service:
    """The served model: its name, tokenizer, chat template (None for a base model) and engine."""

    name: str
    tok: Tokenizer
    engine: Engine
    context: int  # max_seq_len
    stream_interval: float = 0.0  # seconds: streamed tokens are gathered into one SSE chunk per interval
    truncation: str = "disabled"  # a chat request's default: "auto" drops the oldest turns that do not fit
    _mailboxes: dict[int, Mailbox] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.template = ChatTemplate(self.tok) if has_chat_tokens(self.tok) else None

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        box = self._mailboxes.get(id(loop))
        if box is None or box.loop is not loop or box.interval != self.stream_interval:
            box = self._mailboxes[id(loop)] = Mailbox(loop, self.stream_interval)
        return box

    # ------------------------------------------------------------------ request -> job

    def check_model(self, req: _Sampling) -> None:
        if req.model is not None and req.model != self.name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.name}' "
                                f"(GET /v1/models).", param="model", code="model_not_found")

    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], frozenset[int], int]:
        """``(prompt ids, stop ids, messages dropped to fit the context)``."""
        if self.template is None:
            raise ApiError(400, f"'{self.name}' is a base model (its tokenizer has no chat tokens): use "
                                f"/v1/completions, or chat fine-tune it first (nanochat-train sft).",
                           param="messages", code="model_not_chat")
        msgs = [m.as_template_message() for m in req.messages]
        ids, dropped = self.template.encode(msgs), 0
        reply = req.max_tokens if req.max_tokens is not None else self.context // 2
        if (req.truncation or self.truncation) == "auto" and len(ids) + reply > self.context:
            # what still does not fit (the system and newest messages alone) is answered by budget()
            msgs, dropped = fit_history(self.template, msgs, prompt_budget(self.context, reply))
            ids = self.template.encode(msgs)
        # the end of the turn, a new document, or a role marker (the model starting another turn)
        roles = {self.template.role_ids[r] for r in ROLE_TOKENS}
        return ids, frozenset(self.template.stop_ids) | frozenset(roles), dropped

    def completion_prompt(self, req: CompletionRequest) -> tuple[list[int], frozenset[int]]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            bad = [t for t in p if not 0 <= t < self.tok.vocab_size]
            if bad:
                raise ApiError(400, f"Invalid token id {bad[0]} in prompt (vocabulary: 0..{self.tok.vocab_size - 1}).",
                               param="prompt", code="invalid_value")
            ids = list(p)
        else:
            text = p if isinstance(p, str) else (p[0] if p else "")
            ids = self.tok.encode(text) if text else [self.tok.eot_id]  # empty: a new document
        return ids, frozenset([self.tok.eot_id])

    def budget(self, n_prompt: int, req: _Sampling) -> int:
        room = self.context - n_prompt
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the prompt is "
                                f"{n_prompt} tokens, leaving no room for a reply. Shorten the prompt"
                                f"{_AUTO_HINT if isinstance(req, ChatRequest) else ''}.",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + req.max_tokens} tokens ({n_prompt} in the prompt, "
                                f"{req.max_tokens} for the completion). Lower max_tokens to {room} or less"
                                f"{_AUTO_HINT if isinstance(req, ChatRequest) else ''}.",
                           param="max_tokens", code="context_length_exceeded")
        return req.max_tokens if req.max_tokens is not None else room

    def start(self, req: _Sampling, prompt: list[int], stop_ids: frozenset[int]) -> tuple[Job, asyncio.Queue]:
        """Queue the job (503 when the engine is full); its events arrive on the returned queue."""
        box = self._mailbox(asyncio.get_running_loop())
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:  # on the worker thread
            try:
                box.post(events, ev)
            except RuntimeError:  # the event loop is gone (server stopping): nobody to tell
                job.cancel()

        job = Job(prompt, self.budget(len(prompt), req), emit, temperature=req.temperature,
                  top_k=req.top_k or None, top_p=req.top_p, seed=req.seed, stop_ids=stop_ids)
        try:
            self.engine.submit(job)
        except Busy as e:
            raise ApiError(503, f"The server is busy ({e}); retry shortly.", type="server_error",
                           code="server_busy") from None
        return job, events

    # ------------------------------------------------------------------ job -> text

    async def pieces(self, job: Job, events: asyncio.Queue,
                     stop: list[str]) -> AsyncIterator[tuple[str, str | None, int]]:
        """``(text, finish_reason or None, tokens so far)`` as the job runs; the last one has the finish reason.

        The tokens delivered together (:class:`Mailbox`: those of one ``stream_interval``) make one
        piece, decoded once: the text is what feeding them one by one gives. ``tokens so far`` counts
        what the model generated, the end-of-turn / stop token included (OpenAI's ``completion_tokens``)."""
        stream = TextStream(self.tok.decode, stop)
        n = 0
        try:
            while True:
                toks, end = await self._gather(events)
                piece, taken = stream.feed_many(toks)
                n += taken
                if stream.stopped:
                    yield piece, "stop", n
                    return
                if end is None:
                    if piece:
                        yield piece, None, n
                    continue
                kind, value = end
                if kind == "done":
                    n += value == "stop"  # the engine ended on a stop id: the model generated that token too
                    yield piece + stream.flush(), str(value), n
                    return
                if piece:
                    yield piece, None, n
                raise GenerationFailed(str(value))
        finally:
            job.cancel()  # finished, stopped by a stop string, or the client went away: free the row

    @staticmethod
    async def _gather(events: asyncio.Queue) -> tuple[list[int], Event | None]:
        """The next event and all already delivered: ``(token ids, the final event or None)``."""
        toks: list[int] = []
        ev = await events.get()
        while ev[0] == "token":
            toks.append(int(ev[1]))  # type: ignore[arg-type]
            if events.empty():
                return toks, None
            ev = events.get_nowait()
        return toks, ev

    async def whole(self, req: _Sampling, prompt: list[int], stop_ids: frozenset[int], chat: bool) -> dict:
        job, events = self.start(req, prompt, stop_ids)
        text, finish, n = "", "length", 0
        try:
            async for piece, fin, count in self.pieces(job, events, req.stop_strings):
                text, finish, n = text + piece, fin or finish, count
        except GenerationFailed as e:
            raise ApiError(500, str(e), type="server_error", code="generation_failed") from None
        build = chat_response if chat else completion_response
        return build(new_id("chatcmpl" if chat else "cmpl"), self.name, text, finish, len(prompt), n)

    def streamed(self, req: _Sampling, prompt: list[int], stop_ids: frozenset[int], chat: bool) -> AsyncIterator[str]:
        """Queue the job now (so a full engine is a 503 before the stream starts); the SSE lines after."""
        job, events = self.start(req, prompt, stop_ids)
        rid = new_id("chatcmpl" if chat else "cmpl")

        def chunk(text: str, finish: str | None) -> str:
            body = (chat_chunk(rid, self.name, {"content": text} if text or finish is None else {}, finish) if chat
                    else completion_chunk(rid, self.name, text, finish))
            return f"data: {json.dumps(body)}\n\n"

        async def lines() -> AsyncIterator[str]:
            n = 0
            if chat:
                yield f"data: {json.dumps(chat_chunk(rid, self.name, {'role': 'assistant', 'content': ''}, None))}\n\n"
            tail = ""  # the last events go out in one write: finish chunk, usage, [DONE]
            try:
                async for piece, finish, count in self.pieces(job, events, req.stop_strings):
                    n = count
                    if piece and not finish:
                        yield chunk(piece, None)
                    elif finish:
                        tail = (chunk(piece, None) if piece else "") + chunk("", finish)
            except GenerationFailed as e:
                err = ApiError(500, str(e), type="server_error", code="generation_failed")
                tail += f"data: {json.dumps(err.body())}\n\n"
            if req.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                tail += f"data: {json.dumps(usage_chunk(rid, self.name, obj, len(prompt), n))}\n\n"
            yield tail + "data: [DONE]\n\n"

        return lines()
