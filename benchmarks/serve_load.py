"""Load test of ``nanochat-train serve``: concurrent streaming clients on 127.0.0.1, bounded in count and time.

Phases (each a fixed wall time, clients sending streaming chat requests back to back):

* ``--clients`` (default 32) for ``--duration`` s (default 30): failed requests, time to first token
  (first chunk with content) p50/p95, aggregate tokens/s;
* 1 client and 8 clients, ``--ratio-duration`` s each, alternating in ``--ratio-rounds`` rounds (so a
  change in the machine's load hits both): the 8-vs-1 aggregate tokens/s ratio (the batched decode
  target is >= 4x);
* the decode step alone (no HTTP, in this process): ms per step at 1 and 8 rows, interleaved;
* the engine alone (no HTTP, in this process): 1 and 8 "clients" submitting the same chat prompts
  straight to ``serve.engine.Engine`` (prefill, sampling, stop ids, row moves included), interleaved:
  the ceiling the HTTP figures are compared with.

It starts its own server on a free loopback port (``--checkpoint``, or by default a random-init
model of the tiny-cpu shape with the byte tokenizer + chat tokens written to a temp dir), or talks
to ``--url`` (loopback only). Tokens are the server's ``usage.completion_tokens``
(``stream_options.include_usage``)::

    PYTHONPATH=src python benchmarks/serve_load.py --threads 1            # ~75 s
    PYTHONPATH=src python benchmarks/serve_load.py --duration 5 --ratio-duration 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import kit  # benchmarks/kit.py: provenance, interleaved timing


@dataclass
class Result:
    ok: bool
    ttft: float | None = None  # s to the first chunk with content
    tokens: int = 0
    error: str = ""


@dataclass
class Phase:
    clients: int
    seconds: float
    results: list[Result] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]
        ttft = sorted(r.ttft for r in ok if r.ttft is not None)

        def pct(p: float) -> float | None:
            return round(ttft[min(len(ttft) - 1, int(p * len(ttft)))], 4) if ttft else None

        tokens = sum(r.tokens for r in ok)
        return {"clients": self.clients, "seconds": round(self.seconds, 2), "requests": len(self.results),
                "failed": len(self.results) - len(ok), "errors": sorted({r.error for r in self.results if r.error})[:5],
                "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95), "completion_tokens": tokens,
                "tokens_per_s": round(tokens / self.seconds, 1) if self.seconds else 0.0}


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> Result:
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:120]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, error=chunk["error"]["message"][:120])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if ttft is None and (c.get("delta", {}).get("content") or c.get("text")):
                        ttft = time.perf_counter() - t0
    except (httpx.HTTPError, ValueError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}"[:120])
    return Result(done, ttft, tokens, "" if done else "stream ended without [DONE]")


async def run_phase(base_url: str, clients: int, seconds: float | None = None, requests_per_client: int | None = None,
                    max_tokens: int = 64, api_key: str | None = None) -> Phase:
    """``clients`` concurrent clients sending streaming chat requests until ``seconds`` pass (a request
    in flight then finishes) or each has sent ``requests_per_client``."""
    if (seconds is None) == (requests_per_client is None):
        raise ValueError("give exactly one of seconds and requests_per_client")
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    phase = Phase(clients, 0.0)
    t0 = time.perf_counter()

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        n = 0
        while (seconds is not None and time.perf_counter() - t0 < seconds) or \
                (requests_per_client is not None and n < requests_per_client):
            body = {"messages": [{"role": "user", "content": f"client {i} request {n}: say something"}],
                    "max_tokens": max_tokens, "temperature": 1.0, "seed": 1000 * i + n, "stream": True,
                    "stream_options": {"include_usage": True}}
            phase.results.append(await one_request(client, url, body, headers))
            n += 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    phase.seconds = time.perf_counter() - t0
    return phase


# ------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_cpu_chat_checkpoint(root: Path) -> Path:
    """A random-init model of the tiny-cpu shape (dim 256, 4 layers, context 256), byte tokenizer + chat tokens."""
    import torch

    from nanochat_ternary.checkpoint.files import save_checkpoint
    from nanochat_ternary.config import build_config
    from nanochat_ternary.data.chat_template import add_chat_tokens
    from nanochat_ternary.data.tokenizer import byte_tokenizer
    from nanochat_ternary.model.gpt import GPT

    tok = add_chat_tokens(byte_tokenizer())
    tok.save(root / "tokenizer.json")
    cfg = build_config("tiny-cpu", overrides=[f"vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    return save_checkpoint(root / "run", 1, GPT(cfg.model), {}, {"config": cfg.to_dict()},
                           tokenizer_path=root / "tokenizer.json")


def start_server(checkpoint: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanochat_ternary.cli", "serve", "--checkpoint", str(checkpoint),
           "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not answer /health within 120 s")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of process ``pid`` (Linux /proc; {} elsewhere)."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return {}
    return out


def cpu_split(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(CPU s of the busiest thread: the decode worker, CPU s of all the others) between two snapshots."""
    d = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    return (d[0], sum(d[1:])) if d else (0.0, 0.0)


def engine_step_ratio(checkpoint: Path, threads: int, steps: int = 40, rounds: int = 3) -> dict:
    """The decode step alone, no HTTP: ms per batched step at 1 and 8 rows, interleaved rounds (median),
    and the 8-vs-1 tokens/s ratio it allows."""
    import torch

    from nanochat_ternary.checkpoint import open_checkpoint
    from nanochat_ternary.serve.batched import SlotCache, decode_step_fused, fused_decoder, prefill_fused

    if threads:
        torch.set_num_threads(threads)
    model = open_checkpoint(checkpoint, "cpu").model
    dec = fused_decoder(model)
    if dec is None:
        return {}
    def rows(n: int) -> float:
        """ms per decode step at ``n`` rows; the prefill that fills them is not timed."""
        cache = SlotCache(model, 8)
        for row in range(n):
            cache.load(row, prefill_fused(dec, list(range(1, 17)))[0])
        t0 = time.perf_counter()
        for _ in range(steps):
            decode_step_fused(dec, cache, [1] * n)
        return (time.perf_counter() - t0) / steps * 1e3

    timings = kit.interleaved({1: lambda: rows(1), 8: lambda: rows(8)}, reps=rounds, warmup=0,  # type: ignore[dict-item]
                              self_timed=True)
    ms = {n: t.median for n, t in timings.items()}
    return {"ms_per_step_1": round(ms[1], 2), "ms_per_step_8": round(ms[8], 2),
            "ratio_8_vs_1": round(8 * ms[1] / ms[8], 2), "path": f"fused {dec.mode}"}


def engine_ratio(checkpoint: Path, threads: int, seconds: float = 4.0, rounds: int = 2,
                 max_tokens: int = 64) -> dict:
    """Tokens/s of the decode engine alone (no HTTP) with 1 and 8 clients submitting back to back
    the benchmark's chat prompts, interleaved rounds (sums); tokens counted as ``usage`` does."""
    import threading

    import torch

    from nanochat_ternary.checkpoint import open_checkpoint
    from nanochat_ternary.data.chat_template import ROLE_TOKENS, ChatTemplate
    from nanochat_ternary.serve.engine import Engine, Job

    if threads:
        torch.set_num_threads(threads)
    opened = open_checkpoint(checkpoint, "cpu")
    t = ChatTemplate(opened.require_tokenizer())
    stop = frozenset(t.stop_ids) | {t.role_ids[r] for r in ROLE_TOKENS}

    def run(clients: int) -> tuple[int, float]:
        engine = Engine(opened.model, max_batch=8, max_queue=64)
        count, left = [0], threading.Semaphore(0)
        t0 = time.perf_counter()

        def submit(i: int, n: int) -> None:
            def emit(ev: tuple) -> None:
                count[0] += ev[0] == "token" or ev == ("done", "stop")
                if ev[0] != "token":
                    submit(i, n + 1) if time.perf_counter() - t0 < seconds else left.release()
            msgs = [{"role": "user", "content": f"client {i} request {n}: say something"}]
            engine.submit(Job(t.encode(msgs), max_tokens, emit, temperature=1.0, seed=1000 * i + n, stop_ids=stop))

        for i in range(clients):
            submit(i, 0)
        for _ in range(clients):
            left.acquire()
        dt = time.perf_counter() - t0
        engine.close()
        return count[0], dt

    sums = {1: [0, 0.0], 8: [0, 0.0]}
    for _ in range(rounds):
        for n in (1, 8):
            tok, dt = run(n)
            sums[n][0] += tok
            sums[n][1] += dt
    tps = {n: tok / dt for n, (tok, dt) in sums.items()}
    return {"tokens_per_s_1": round(tps[1], 1), "tokens_per_s_8": round(tps[8], 1),
            "ratio_8_vs_1": round(tps[8] / tps[1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server on a loopback address (default: start one)")
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: random-init tiny-cpu shape)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--ratio-duration", type=float, default=15.0, help="seconds for each of the 1- and 8-client runs")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--ratio-rounds", type=int, default=3, help="alternating 1- and 8-client rounds")
    ap.add_argument("--stream-interval", type=float, help="the server's --stream-interval (ms; default: its own)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    head = kit.header("serve_load", clients=args.clients, duration=args.duration, ratio_duration=args.ratio_duration,
                      max_tokens=args.max_tokens, server_threads=args.threads, max_batch=args.max_batch,
                      url=args.url or "-")

    proc = None
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            host = urlparse(args.url).hostname or ""
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                sys.exit("--url: loopback addresses only (this is a load generator)")
            url = args.url
        else:
            ckpt = Path(args.checkpoint) if args.checkpoint else tiny_cpu_chat_checkpoint(Path(tmp))
            port = free_port()
            extra = [] if args.stream_interval is None else ["--stream-interval", str(args.stream_interval)]
            proc = start_server(ckpt, port, ["--threads", str(args.threads), "--max-batch", str(args.max_batch),
                                             "--max-queue", str(args.max_queue), *extra])
            url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_phase(url, 1, requests_per_client=1, max_tokens=4))  # warm-up
            load = asyncio.run(run_phase(url, args.clients, args.duration, max_tokens=args.max_tokens)).summary()
            phases: dict[int, list[Phase]] = {1: [], 8: []}
            cpu = {1: [0.0, 0.0], 8: [0.0, 0.0]}  # server CPU s: decode thread, the other threads
            for _ in range(args.ratio_rounds):
                for n in (1, 8):
                    before = thread_cpu(proc.pid) if proc else {}
                    phases[n].append(asyncio.run(run_phase(url, n, args.ratio_duration / args.ratio_rounds,
                                                           max_tokens=args.max_tokens)))
                    dec, rest = cpu_split(before, thread_cpu(proc.pid)) if proc else (0.0, 0.0)
                    cpu[n][0] += dec
                    cpu[n][1] += rest
            one, eight = (Phase(n, sum(p.seconds for p in ps), [r for p in ps for r in p.results]).summary()
                          for n, ps in phases.items())
            health = httpx.get(url + "/health", timeout=5).json()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        engine = engine_step_ratio(ckpt, args.threads) if not args.url else {}
        engine_alone = engine_ratio(ckpt, args.threads) if not args.url else {}
    ratio = eight["tokens_per_s"] / one["tokens_per_s"] if one["tokens_per_s"] else float("nan")
    for summ, n in ((one, 1), (eight, 8)):  # CPU per token: what the server spent, whatever its share of the cores
        tok = summ["completion_tokens"]
        summ["server_cpu_ms_per_token"] = {"decode_thread": round(1e3 * cpu[n][0] / tok, 3) if tok else None,
                                         "other_threads": round(1e3 * cpu[n][1] / tok, 3) if tok else None}
        summ["decode_thread_cpu_share"] = round(cpu[n][0] / summ["seconds"], 2) if summ["seconds"] else None
    dec1, dec8 = (x["server_cpu_ms_per_token"]["decode_thread"] for x in (one, eight))
    per_cpu = (dec1 or 0) / (dec8 or 1)
    out = {"load": load, "one_client": one, "eight_clients": eight, "ratio_8_vs_1": round(ratio, 2),
           "ratio_8_vs_1_per_decode_cpu": round(per_cpu, 2) if proc is not None else None,
           "server": {k: health.get(k) for k in ("model", "max_batch", "max_queue", "decode_steps", "mean_batch")},
           "engine_only": engine, "engine_alone": engine_alone, "threads": args.threads,
           "max_tokens": args.max_tokens, "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "header": head}
    for name in ("load", "one_client", "eight_clients"):
        s = out[name]
        print(f"{name:14s} clients={s['clients']:3d} requests={s['requests']:4d} failed={s['failed']} "
              f"ttft p50={s['ttft_p50_s']} s p95={s['ttft_p95_s']} s tokens/s={s['tokens_per_s']}")
    print(f"8 clients vs 1: {out['ratio_8_vs_1']}x aggregate tokens/s (target >= 4x)")
    if proc is not None:
        for name in ("one_client", "eight_clients"):
            c, sh = out[name]["server_cpu_ms_per_token"], out[name]["decode_thread_cpu_share"]
            print(f"  {name}: server CPU ms per token: decode thread {c['decode_thread']}, other threads "
                  f"{c['other_threads']}; the decode thread had {sh} of a core")
        print(f"  per decode-thread CPU second: {out['ratio_8_vs_1_per_decode_cpu']}x (the batching gain, "
              f"whatever share of the cores the machine gave the server)")
    if engine_alone:
        print(f"engine alone (no HTTP): {engine_alone['tokens_per_s_1']} tokens/s with 1 client, "
              f"{engine_alone['tokens_per_s_8']} with 8: {engine_alone['ratio_8_vs_1']}x")
    print(f"load average: {load_start[0]:.2f} at the start, {out['loadavg_end'][0]:.2f} at the end")
    if engine:
        print(f"decode step alone ({engine['path']}): {engine['ms_per_step_1']} ms at 1 row, "
              f"{engine['ms_per_step_8']} ms at 8 rows: {engine['ratio_8_vs_1']}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
