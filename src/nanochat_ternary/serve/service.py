"""What the routes call: requests -> prompt ids -> an engine job -> text, streamed or whole.

The prompt must leave room in the context: a prompt of ``P`` tokens in a context of ``C`` allows
``max_tokens <= C - P`` (default: all of it); more is a 400 ``context_length_exceeded``, as OpenAI
answers, never a silent truncation (the web page drops old turns itself and says so).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

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


class GenerationFailed(Exception):
    pass


@dataclass
class Service:
    """The served model: its name, tokenizer, chat template (None for a base model) and engine."""

    name: str
    tok: Tokenizer
    engine: Engine
    context: int  # max_seq_len

    def __post_init__(self) -> None:
        self.template = ChatTemplate(self.tok) if has_chat_tokens(self.tok) else None

    # ------------------------------------------------------------------ request -> job

    def check_model(self, req: _Sampling) -> None:
        if req.model is not None and req.model != self.name:
            raise ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.name}' "
                                f"(GET /v1/models).", param="model", code="model_not_found")

    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], frozenset[int]]:
        if self.template is None:
            raise ApiError(400, f"'{self.name}' is a base model (its tokenizer has no chat tokens): use "
                                f"/v1/completions, or chat fine-tune it first (nanochat-train sft).",
                           param="messages", code="model_not_chat")
        ids = self.template.encode([m.as_template_message() for m in req.messages])
        # the end of the turn, a new document, or a role marker (the model starting another turn)
        roles = {self.template.role_ids[r] for r in ROLE_TOKENS}
        return ids, frozenset(self.template.stop_ids) | frozenset(roles)

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
                                f"{n_prompt} tokens, leaving no room for a reply. Shorten the prompt.",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + req.max_tokens} tokens ({n_prompt} in the prompt, "
                                f"{req.max_tokens} for the completion). Lower max_tokens to {room} or less.",
                           param="max_tokens", code="context_length_exceeded")
        return req.max_tokens if req.max_tokens is not None else room

    def start(self, req: _Sampling, prompt: list[int], stop_ids: frozenset[int]) -> tuple[Job, asyncio.Queue]:
        """Queue the job (503 when the engine is full); its events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:  # on the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
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
        """``(text, finish_reason or None, tokens so far)`` as the job runs; the last one has the finish reason."""
        stream = TextStream(self.tok.decode, stop)
        n = 0
        try:
            while True:
                kind, value = await events.get()
                if kind == "token":
                    n += 1
                    piece = stream.feed(int(value))  # type: ignore[arg-type]
                    if stream.stopped:
                        yield piece, "stop", n
                        return
                    if piece:
                        yield piece, None, n
                elif kind == "done":
                    yield stream.flush(), str(value), n
                    return
                else:
                    raise GenerationFailed(str(value))
        finally:
            job.cancel()  # finished, stopped by a stop string, or the client went away: free the row

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
            try:
                async for piece, finish, count in self.pieces(job, events, req.stop_strings):
                    n = count
                    if piece:
                        yield chunk(piece, None)
                    if finish:
                        yield chunk("", finish)
            except GenerationFailed as e:
                err = ApiError(500, str(e), type="server_error", code="generation_failed")
                yield f"data: {json.dumps(err.body())}\n\n"
            if req.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield f"data: {json.dumps(usage_chunk(rid, self.name, obj, len(prompt), n))}\n\n"
            yield "data: [DONE]\n\n"

        return lines()
