"""`make bench`: Kleis against the floor a Python proxy can reach (SPEC S15).

Run:  .venv/bin/python tests/bench.py [--quick] [--duration S] [--no-slow] [--only CELLS]
      [--loadgen auto|wrk|python] [--pyspy PATH] [--kleis-dir DIR] [--keep]
Full run ~4 min, --quick ~1 min. Exit status 1 if the usage counts do not match.

One run starts, each as its own process on 127.0.0.1 (random free ports):
  * upstream: a fake Codex/Anthropic backend (raw asyncio protocol on uvloop, pre-rendered
    bytes, so it is never the bottleneck); `x-bench-delay-ms: N` spaces the events N ms apart;
  * bare:     the thinnest reasonable Sanic + aiohttp pass-through (one ClientSession, chunks
    streamed through, no auth, no DB, no parsing);
  * kleis:    `python kleis.py serve --config <tmp>/config.toml`, fresh SQLite DB, a Codex and
    a Claude account imported and an API key created through the admin API.
Each cell (workload x concurrency) is driven with wrk (apt-get install wrk) against direct
upstream, bare and Kleis for the same fixed time after a warm-up; CPU per request comes from
/proc/<pid>/stat (utime+stime) deltas of the proxy process. Then: Kleis start-up time, idle
RSS, time to first byte at concurrency 1 (aiohttp client, direct/bare/Kleis interleaved),
1,000 concurrent slow streams through Kleis (peak RSS, none dropped) and the usage counters in
Kleis's SQLite DB: an exact batch of N requests must add exactly N requests, N successes and the
upstream's tokens; over the whole run, requests - cancelled <= upstream-received <= requests
(wrk cuts in-flight requests at the end of each cell). Without wrk (or with --loadgen python),
two aiohttp processes generate the load (slower: fine for Kleis vs bare, not for direct).
Real-size cells (codex-real, claude-real) send the requests OpenCode, Claude Code and Codex CLI
really sent (30-55 KB bodies, their own headers; --samples DIR, default ../shared/data) in turn
to bare and Kleis at c=1 and 128, and add CPU ms per KB of request body.
--workers N runs Kleis as N processes on one port (a launcher forks it before the app is
built; SO_REUSEPORT), to measure several workers against one; CPU is summed over them.
--pyspy PATH also records bare and Kleis under each c=128 cell with py-spy (raw stacks and a
summary in bench-results/). --kleis-dir runs another checkout (e.g. to compare a patch).
The table is printed and written to bench-results/latest.txt. Not collected by pytest.

Internal entry points (used by the orchestrator): `bench.py _upstream PORT`,
`bench.py _bare PORT UPSTREAM_URL` and `bench.py _loadgen JSON`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# ══ Payloads (shared by the fake upstream and the clients) ══════════════════

WORDS = (
    "the quick brown fox jumps over a lazy dog while the proxy streams every token back "
    "to its client without buffering anything it does not have to"
).split()


def sse(kind: str, payload: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, separators=(',', ':'))}\n\n".encode()


def codex_events(model: str = "gpt-5.5") -> list[bytes]:
    """A Responses stream of 50 events ending in response.completed with usage."""
    rid, iid = "resp_bench0001", "msg_bench0001"
    shell = {
        "id": rid,
        "object": "response",
        "created_at": 1767225600,
        "status": "in_progress",
        "model": model,
        "output": [],
        "usage": None,
    }
    text = ""
    out = [
        sse("response.created", {"sequence_number": 0, "response": shell}),
        sse("response.in_progress", {"sequence_number": 1, "response": shell}),
        sse(
            "response.output_item.added",
            {
                "sequence_number": 2,
                "output_index": 0,
                "item": {
                    "id": iid,
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                },
            },
        ),
        sse(
            "response.content_part.added",
            {
                "sequence_number": 3,
                "item_id": iid,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ),
    ]
    for i in range(42):
        delta = " " + WORDS[i % len(WORDS)]
        text += delta
        out.append(
            sse(
                "response.output_text.delta",
                {
                    "sequence_number": 4 + i,
                    "item_id": iid,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": delta,
                    "logprobs": [],
                },
            )
        )
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": iid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    usage = {
        "input_tokens": 1200,
        "input_tokens_details": {"cached_tokens": 200},
        "output_tokens": 42,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 1242,
    }
    out += [
        sse(
            "response.output_text.done",
            {
                "sequence_number": 46,
                "item_id": iid,
                "output_index": 0,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            },
        ),
        sse(
            "response.content_part.done",
            {"sequence_number": 47, "item_id": iid, "output_index": 0, "content_index": 0, "part": part},
        ),
        sse("response.output_item.done", {"sequence_number": 48, "output_index": 0, "item": item}),
        sse(
            "response.completed",
            {
                "sequence_number": 49,
                "response": {**shell, "status": "completed", "output": [item], "usage": usage},
            },
        ),
    ]
    return out


def codex_json(model: str = "gpt-5.5") -> bytes:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(42))
    return json.dumps(
        {
            "id": "resp_bench0002",
            "object": "response",
            "created_at": 1767225600,
            "status": "completed",
            "model": model,
            "output": [
                {
                    "id": "msg_bench0002",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": 1200,
                "input_tokens_details": {"cached_tokens": 200},
                "output_tokens": 42,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 1242,
            },
        },
        separators=(",", ":"),
    ).encode()


def claude_events(model: str = "claude-sonnet-4-5") -> list[bytes]:
    """A Messages stream of 50 events: text, a tool_use block named mcp_Shell, usage, stop."""
    out = [
        sse(
            "message_start",
            {
                "message": {
                    "id": "msg_bench0001",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 1200,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 200,
                        "output_tokens": 1,
                    },
                }
            },
        ),
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("ping", {}),
    ]
    for i in range(39):
        out.append(
            sse(
                "content_block_delta",
                {"index": 0, "delta": {"type": "text_delta", "text": " " + WORDS[i % len(WORDS)]}},
            )
        )
    out += [
        sse("content_block_stop", {"index": 0}),
        sse(
            "content_block_start",
            {
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_bench0001",
                    "name": "mcp_Shell",
                    "input": {},
                },
            },
        ),
    ]
    for piece in ('{"command":', ' "ls -la', ' /tmp"}'):
        out.append(
            sse(
                "content_block_delta",
                {"index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}},
            )
        )
    out += [
        sse("content_block_stop", {"index": 1}),
        sse(
            "message_delta",
            {"delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 57}},
        ),
        sse("message_stop", {}),
    ]
    return out


def claude_json(model: str = "claude-sonnet-4-5") -> bytes:
    return json.dumps(
        {
            "id": "msg_bench0002",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [
                {"type": "text", "text": "ok"},
                {
                    "type": "tool_use",
                    "id": "toolu_bench0002",
                    "name": "mcp_Shell",
                    "input": {"command": "ls"},
                },
            ],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 1200, "cache_read_input_tokens": 200, "output_tokens": 57},
        },
        separators=(",", ":"),
    ).encode()


INSTRUCTIONS = ("You are a coding agent running in a terminal. " * 40).strip()


def client_body(provider: str, stream: bool) -> bytes:
    """A moderate (~4 KB) agent request, compact JSON."""
    if provider == "codex":
        body = {
            "model": "gpt-5.5",
            "instructions": INSTRUCTIONS,
            "stream": stream,
            "store": False,
            "prompt_cache_key": "bench-session-1",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "List the files in /tmp."}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Sure. " * 50}]},
                {"role": "user", "content": [{"type": "input_text", "text": "And now in /var."}]},
            ],
            "tools": [
                {
                    "type": "function",
                    "name": "shell",
                    "description": "Run a shell command",
                    "parameters": {
                        "type": "object",
                        "properties": {"command": {"type": "string"}},
                        "required": ["command"],
                    },
                }
            ],
            "reasoning": {"effort": "medium"},
            "include": ["reasoning.encrypted_content"],
        }
    else:
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "stream": stream,
            "system": [{"type": "text", "text": INSTRUCTIONS}],
            "metadata": {"user_id": "user_abc_account_def_session_bench-session-1"},
            "messages": [
                {"role": "user", "content": "List the files in /tmp."},
                {"role": "assistant", "content": "Sure. " * 50},
                {"role": "user", "content": "And now in /var."},
            ],
            "tools": [
                {
                    "name": "Shell",
                    "description": "Run a shell command",
                    "input_schema": {
                        "type": "object",
                        "properties": {"command": {"type": "string"}},
                        "required": ["command"],
                    },
                }
            ],
        }
    return json.dumps(body, separators=(",", ":")).encode()


# Real request sizes: the turns OpenCode, Claude Code and Codex CLI sent to Kleis, recorded in
# the project's shared data (30-55 KB each). A real-size cell cycles through every sample of its
# route, each with the headers its client sent (credentials replaced by the target's).
SAMPLE_SETS = {
    "codex": ("opencode-samples/*openai-responses-turn*.json", "client-samples/codex-cli-*-responses-*"),
    "claude": (
        "opencode-samples/*anthropic-messages-turn*.json",
        "client-samples/claude-code-*-messages-*",
    ),
}
SAMPLE_HEADER_DROP = frozenset({"host", "content-length", "connection", "authorization", "x-api-key"})


@dataclass
class Sample:
    name: str
    path: str  # the Kleis route with its query, e.g. /anthropic/v1/messages?beta=true
    headers: dict[str, str]
    body: bytes  # compact JSON as a JavaScript client writes it (UTF-8, not ASCII-escaped)


def load_samples(data_dir: Path, provider: str) -> list[Sample]:
    out = []
    for pattern in SAMPLE_SETS[provider]:
        for f in sorted(data_dir.glob(pattern)):
            rec = json.loads(f.read_text())
            headers = {k: v for k, v in rec["headers"].items() if k.lower() not in SAMPLE_HEADER_DROP}
            body = json.dumps(rec["body"], separators=(",", ":"), ensure_ascii=False).encode()
            out.append(Sample(f.stem, rec["path"], headers, body))
    return out


# ══ Fake upstream (its own process) ═════════════════════════════════════════
# A minimal HTTP/1.1 server: Content-Length request bodies, keep-alive, pipelining-safe.
# Counts requests per `x-bench-tag` (GET /_stats) so usage can be checked exactly.

STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _json_reply(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )


class Replies:
    def __init__(self) -> None:
        self.events = {"codex": codex_events(), "claude": claude_events()}
        # Fast mode: headers and the whole stream (in 5 HTTP chunks of 10 events) in one write.
        self.fast = {
            name: SSE_HEAD
            + b"".join(_chunk(b"".join(ev[i : i + 10])) for i in range(0, len(ev), 10))
            + b"0\r\n\r\n"
            for name, ev in self.events.items()
        }
        self.json = {"codex": _json_reply(codex_json()), "claude": _json_reply(claude_json())}
        self.chunks = {name: [_chunk(e) for e in ev] for name, ev in self.events.items()}


class UpstreamProtocol(asyncio.Protocol):
    replies: Replies
    stats: dict

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.process()

    def process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            try:
                method, target, _ = lines[0].split(b" ", 2)
            except ValueError:
                self.transport.close()
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                self.transport.write(
                    _json_reply(b'{"error":"chunked request bodies unsupported"}', "400 Bad Request")
                )
                self.transport.close()
                return
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.handle(method, target.split(b"?", 1)[0], headers, body)

    def handle(self, method: bytes, path: bytes, headers: dict, body: bytes) -> None:
        t = self.transport
        if method == b"GET" and path == b"/_stats":
            t.write(_json_reply(json.dumps(self.stats).encode()))
            return
        if method == b"GET" and path == b"/healthz":
            t.write(_json_reply(b'{"ok":true}'))
            return
        if method != b"POST" or path not in (b"/responses", b"/v1/messages"):
            t.write(_json_reply(b'{"error":"not found"}', "404 Not Found"))
            return
        provider = "codex" if path == b"/responses" else "claude"
        tag = headers.get(b"x-bench-tag", b"untagged").decode()
        key = f"{tag}:{provider}"
        self.stats[key] = self.stats.get(key, 0) + 1
        if not STREAM_TRUE.search(body):
            t.write(self.replies.json[provider])
            return
        delay = int(headers.get(b"x-bench-delay-ms", b"0") or 0)
        if delay <= 0:
            t.write(self.replies.fast[provider])
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self.slow(provider, delay / 1000))

    async def slow(self, provider: str, delay: float) -> None:
        t = self.transport
        t.write(SSE_HEAD)
        for chunk in self.replies.chunks[provider]:
            await asyncio.sleep(delay)
            if t.is_closing():
                return
            t.write(chunk)
        t.write(b"0\r\n\r\n")
        self.busy = False
        self.process()


def run_upstream(port: int) -> None:
    import uvloop

    UpstreamProtocol.replies = Replies()
    UpstreamProtocol.stats = {}

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            UpstreamProtocol, "127.0.0.1", port, backlog=4096
        )
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# ══ Bare pass-through (its own process) ═════════════════════════════════════

HOP_BY_HOP = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "accept-encoding",
        "authorization",
        "x-api-key",
        "expect",
    }
)


def run_bare(port: int, upstream: str) -> None:
    import aiohttp
    from sanic import Sanic

    app = Sanic("bare_passthrough", configure_logging=False)
    app.config.ACCESS_LOG = False
    app.config.AUTO_EXTEND = False
    app.config.KEEP_ALIVE_TIMEOUT = 75
    targets = {
        "/openai/v1/responses": upstream + "/responses",
        "/anthropic/v1/messages": upstream + "/v1/messages?beta=true",
    }

    @app.before_server_start
    async def start(app, _loop=None):
        app.ctx.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    @app.after_server_stop
    async def stop(app, _loop=None):
        await app.ctx.http.close()

    async def passthrough(request):
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        headers["authorization"] = "Bearer upstream-token"
        resp = await app.ctx.http.post(targets[request.path], data=request.body, headers=headers)
        try:
            out = await request.respond(
                status=resp.status,
                headers={"content-type": resp.headers.get("content-type", "application/octet-stream")},
            )
            async for chunk in resp.content.iter_any():
                await out.send(chunk)
            await out.eof()
        finally:
            resp.release()
        return None  # Sanic 25 logs an error when a handler returns a response it already sent

    for path in targets:
        app.add_route(passthrough, path, methods=["POST"], name=path.strip("/").replace("/", "_"))
    app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)


# ══ Orchestration helpers ═══════════════════════════════════════════════════


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Children get SIGTERM if the bench process dies (even on SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Procs:
    """Every child we start; stopped in reverse order, always."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        out = open(log, "wb")
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,
            **kw,
        )
        out.close()
        self.items.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.items):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for _, proc in reversed(self.items):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self.items.clear()


def cpu_ticks(pid: int) -> int:
    """CPU ticks of `pid` and of its live children (Kleis's extra workers, see --workers)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError, ValueError):
                ticks += cpu_ticks(int(child))
    return ticks


def run_workers(count: int, kleis_dir: str, argv: list[str]) -> None:
    """`bench.py _workers N KLEIS_DIR ARGS...`: `kleis.py ARGS...` as N processes, each a whole
    Kleis instance (its own caches, usage queue and writer id, like N instances sharing one
    database): the process forks just before the app and its instance are built, and each
    worker binds the port with SO_REUSEPORT, so the kernel spreads connections over them."""
    sys.path.insert(0, kleis_dir)
    os.chdir(kleis_dir)
    import kleis

    build = kleis.create_app

    def per_worker(*args, **kw):
        for _ in range(count - 1):
            if os.fork() == 0:
                _die_with_parent()  # a fork does not inherit the parent-death signal
                break
        return build(*args, **kw)

    def reuse_port(host: str, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        return sock

    kleis.create_app, kleis.listening_socket = per_worker, reuse_port
    sys.exit(kleis.main(argv))


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def listen_overflows() -> int:
    """TcpExt ListenOverflows: connections dropped because an accept queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split(), vals.split(), strict=False)).get("ListenOverflows", 0))
    return 0


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    """Seconds until `url` answers 200; fails with the log tail if the process exits."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            status, _ = http_get(url, timeout=0.5)
            if status == 200:
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{url}: not up after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)


# ══ Load: wrk ═══════════════════════════════════════════════════════════════


@dataclass
class Target:
    name: str  # direct | bare | kleis
    base: str
    pid: int | None  # the process whose CPU is charged (None: direct)
    auth: str = ""

    def path(self, provider: str) -> str:
        if self.name == "direct":
            return "/responses" if provider == "codex" else "/v1/messages"
        return "/openai/v1/responses" if provider == "codex" else "/anthropic/v1/messages"


@dataclass
class Cell:
    name: str
    provider: str
    stream: bool
    delay_ms: int = 0
    targets: tuple[str, ...] = ("direct", "bare", "kleis")
    samples: tuple[Sample, ...] = ()  # real-size cell: these requests in turn, not client_body
    concs: tuple[int, ...] | None = None  # None: the run's concurrencies
    max_cpu: float = 1.2  # target: Kleis CPU per request <= max_cpu x bare
    min_thr: float | None = 0.85  # target: Kleis throughput >= min_thr x bare (None: no target)

    @property
    def kb(self) -> float:
        """Mean request body in KB."""
        bodies = [s.body for s in self.samples] or [client_body(self.provider, self.stream)]
        return sum(len(b) for b in bodies) / len(bodies) / 1024


@dataclass
class Result:
    cell: str
    conc: int
    target: str
    requests: int = 0
    rps: float = 0.0
    p50: float = 0.0  # ms
    p99: float = 0.0
    non2xx: int = 0
    errors: int = 0
    cpu_ms_per_req: float | None = None
    proxy_cpu_pct: float | None = None
    upstream_cpu_pct: float = 0.0
    wrk_cpu_pct: float = 0.0
    machine_pct: float = 0.0  # whole machine busy, 100 = every core
    overflows: int = 0


UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * UNIT_MS[m.group(2)] if m else float("nan")


class Wrk:
    def __init__(self, tmp: Path, upstream_pid: int) -> None:
        self.tmp = tmp
        self.upstream_pid = upstream_pid
        self.binary = shutil.which("wrk")
        self.scripts: dict[tuple, Path] = {}

    def script(self, target: Target, cell: Cell) -> Path:
        key = (target.name, cell.name)
        if key not in self.scripts:
            body = self.tmp / f"body-{cell.provider}-{int(cell.stream)}.json"
            body.write_bytes(client_body(cell.provider, cell.stream))
            headers = {"Content-Type": "application/json", "x-bench-tag": target.name}
            if target.auth:
                headers["Authorization"] = f"Bearer {target.auth}"
            if cell.provider == "claude":
                headers["anthropic-version"] = "2023-06-01"
            if cell.delay_ms:
                headers["x-bench-delay-ms"] = str(cell.delay_ms)
            lua = [
                f'local f = io.open("{body}", "rb")',
                'wrk.body = f:read("*a")',
                "f:close()",
                'wrk.method = "POST"',
            ]
            lua += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
            if cell.samples:
                lua = self.samples_lua(target, cell, headers)
            path = self.tmp / f"wrk-{target.name}-{cell.name}.lua"
            path.write_text("\n".join(lua) + "\n")
            self.scripts[key] = path
        return self.scripts[key]

    def samples_lua(self, target: Target, cell: Cell, common: dict) -> list[str]:
        """A wrk script sending the cell's samples in turn, each formatted once in init()."""
        lua = ["local reqs, n, i = {}, 0, 0", "function init(args)"]
        for k, sample in enumerate(cell.samples):
            path = self.tmp / f"sample-{cell.name}-{k}.json"
            path.write_bytes(sample.body)
            headers = {**sample.headers, **{k: v for k, v in common.items() if k != "Content-Type"}}
            fields = ", ".join(f"[ [==[{k}]==] ] = [==[{v}]==]" for k, v in headers.items())
            lua += [
                f'  local f = io.open("{path}", "rb")',
                '  local body = f:read("*a")',
                "  f:close()",
                f'  reqs[{k + 1}] = wrk.format("POST", [==[{sample.path}]==], {{{fields}}}, body)',
            ]
        lua += [f"  n = {len(cell.samples)}", "end"]
        lua += ["function request()", "  i = i % n + 1", "  return reqs[i]", "end"]
        return lua

    def run(self, target: Target, cell: Cell, conc: int, seconds: float) -> Result:
        url = target.base + target.path(cell.provider)
        argv = [
            self.binary,
            "-t",
            "1",
            "-c",
            str(conc),
            "-d",
            f"{int(seconds)}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(self.script(target, cell)),
            url,
        ]
        t_proxy = cpu_ticks(target.pid) if target.pid else 0
        t_up = cpu_ticks(self.upstream_pid)
        m_busy, m_total = machine_ticks()
        ovf = listen_overflows()
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        try:
            output = proc.stdout.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - start
        res = Result(cell.name, conc, target.name)
        busy, total = machine_ticks()
        res.machine_pct = 100 * (busy - m_busy) / max(total - m_total, 1)
        res.overflows = listen_overflows() - ovf
        if proc.returncode != 0 or "requests in" not in output:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(argv)}\n{output}")
        m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
        res.requests = int(m.group(1))
        m = re.search(r"Requests/sec:\s+([\d.]+)", output)
        res.rps = float(m.group(1))
        for pct, attr in (("50", "p50"), ("99", "p99")):
            m = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.M)
            setattr(res, attr, parse_ms(m.group(1)) if m else float("nan"))
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        res.non2xx = int(m.group(1)) if m else 0
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
        res.errors = sum(int(g) for g in m.groups()) if m else 0
        if target.pid:
            ticks = cpu_ticks(target.pid) - t_proxy
            res.cpu_ms_per_req = ticks * 1000 / CLK_TCK / max(res.requests, 1)
            res.proxy_cpu_pct = 100 * ticks / CLK_TCK / wall
        res.upstream_cpu_pct = 100 * (cpu_ticks(self.upstream_pid) - t_up) / CLK_TCK / wall
        res.wrk_cpu_pct = 100 * (usage.ru_utime + usage.ru_stime) / wall
        return res


# ══ Load: Python fallback (multi-process aiohttp) ═══════════════════════════


def run_loadgen(spec: str) -> None:
    """`bench.py _loadgen '<json>'`: `conc` keep-alive connections for `seconds`; prints JSON
    with completed requests (read to the end before the deadline) and latencies."""
    import aiohttp
    import uvloop

    cfg = json.loads(spec)
    # (url, headers, body) in turn: one request, or a real-size cell's samples
    reqs = [(r["url"], r["headers"], Path(r["body"]).read_bytes()) for r in cfg["requests"]]

    async def main() -> dict:
        lat: list[float] = []
        res = {"requests": 0, "non2xx": 0, "errors": 0}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg["seconds"]
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        ) as http:

            async def worker(k: int) -> None:
                while loop.time() < deadline:
                    url, headers, body = reqs[k % len(reqs)]
                    k += 1
                    start = time.perf_counter()
                    try:
                        async with http.post(url, data=body, headers=headers) as r:
                            while await r.content.readany():
                                pass
                            status = r.status
                    except (aiohttp.ClientError, TimeoutError):
                        res["errors"] += 1
                        continue
                    lat.append((time.perf_counter() - start) * 1000)
                    res["requests"] += 1
                    if not 200 <= status < 400:
                        res["non2xx"] += 1

            tasks = [asyncio.create_task(worker(k)) for k in range(cfg["conc"])]
            await asyncio.wait(tasks, timeout=cfg["seconds"])
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        res["latencies"] = lat
        return res

    print(json.dumps(uvloop.run(main())))


class PyLoad:
    """Same interface as Wrk: `procs` aiohttp processes share the connections."""

    def __init__(self, tmp: Path, upstream_pid: int, procs: int = 2) -> None:
        self.wrk = Wrk.__new__(Wrk)
        self.wrk.tmp, self.wrk.upstream_pid, self.wrk.scripts = tmp, upstream_pid, {}
        self.tmp, self.upstream_pid, self.procs = tmp, upstream_pid, procs

    def run(self, target: Target, cell: Cell, conc: int, seconds: float) -> Result:
        headers = request_headers(target, cell.provider, cell.delay_ms)
        if cell.samples:
            requests = []
            for k, sample in enumerate(cell.samples):
                body = self.tmp / f"sample-{cell.name}-{k}.json"
                body.write_bytes(sample.body)
                hdr = {**sample.headers, **{k: v for k, v in headers.items() if k != "Content-Type"}}
                requests.append({"url": target.base + sample.path, "headers": hdr, "body": str(body)})
        else:
            body = self.tmp / f"body-{cell.provider}-{int(cell.stream)}.json"
            body.write_bytes(client_body(cell.provider, cell.stream))
            url = target.base + target.path(cell.provider)
            requests = [{"url": url, "headers": headers, "body": str(body)}]
        n = min(self.procs, conc)
        shares = [conc // n + (1 if i < conc % n else 0) for i in range(n)]
        t_proxy = cpu_ticks(target.pid) if target.pid else 0
        t_up = cpu_ticks(self.upstream_pid)
        m_busy, m_total = machine_ticks()
        ovf = listen_overflows()
        start = time.monotonic()
        children = [
            subprocess.Popen(
                [
                    PY,
                    __file__,
                    "_loadgen",
                    json.dumps({"requests": requests, "conc": share, "seconds": seconds}),
                ],
                stdout=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            for share in shares
        ]
        outputs, cpu = [], 0.0
        try:
            for child in children:
                outputs.append(json.loads(child.stdout.read()))
                _, status, usage = os.wait4(child.pid, 0)
                child.returncode = os.waitstatus_to_exitcode(status)
                cpu += usage.ru_utime + usage.ru_stime
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    child.wait()
        wall = time.monotonic() - start
        res = Result(cell.name, conc, target.name)
        lat = sorted(x for o in outputs for x in o["latencies"])
        res.requests = sum(o["requests"] for o in outputs)
        res.rps = res.requests / seconds
        res.p50 = lat[len(lat) // 2] if lat else float("nan")
        res.p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        res.non2xx = sum(o["non2xx"] for o in outputs)
        res.errors = sum(o["errors"] for o in outputs)
        if target.pid:
            ticks = cpu_ticks(target.pid) - t_proxy
            res.cpu_ms_per_req = ticks * 1000 / CLK_TCK / max(res.requests, 1)
            res.proxy_cpu_pct = 100 * ticks / CLK_TCK / wall
        res.upstream_cpu_pct = 100 * (cpu_ticks(self.upstream_pid) - t_up) / CLK_TCK / wall
        res.wrk_cpu_pct = 100 * cpu / wall
        busy, total = machine_ticks()
        res.machine_pct = 100 * (busy - m_busy) / max(total - m_total, 1)
        res.overflows = listen_overflows() - ovf
        return res


# ══ Async phases (aiohttp client in this process) ═══════════════════════════


def bench_accounts() -> dict[str, dict]:
    """provider -> the admin import body of the bench's account (tokens valid for a week)."""
    expires = int(time.time() * 1000) + 7 * 86_400_000
    return {
        provider: {
            "accessToken": f"{provider}-access-{secrets.token_hex(8)}",
            "refreshToken": f"{provider}-refresh-{secrets.token_hex(8)}",
            "expiresAt": expires,
            "accountId": account,
            "label": f"bench-{provider}",
        }
        for provider, account in (("codex", "acct_bench"), ("claude", None))
    }


async def kleis_setup(base: str, admin: str) -> str:
    import aiohttp

    hdr = {"Authorization": f"Bearer {admin}"}
    async with aiohttp.ClientSession() as http:
        for provider, payload in bench_accounts().items():
            async with http.post(f"{base}/admin/accounts/{provider}/import", json=payload, headers=hdr) as r:
                if r.status != 201:
                    raise RuntimeError(f"account import {provider}: {r.status} {await r.text()}")
        async with http.post(f"{base}/admin/keys", json={"label": "bench"}, headers=hdr) as r:
            if r.status != 201:
                raise RuntimeError(f"key create: {r.status} {await r.text()}")
            return (await r.json())["key"]["key"]


def request_headers(target: Target, provider: str, delay_ms: int = 0) -> dict:
    headers = {"Content-Type": "application/json", "x-bench-tag": target.name}
    if target.auth:
        headers["Authorization"] = f"Bearer {target.auth}"
    if provider == "claude":
        headers["anthropic-version"] = "2023-06-01"
    if delay_ms:
        headers["x-bench-delay-ms"] = str(delay_ms)
    return headers


async def smoke(targets: list[Target]) -> list[str]:
    """One request per target and workload: status 200, terminal event, tool name restored."""
    import aiohttp

    problems = []
    async with aiohttp.ClientSession() as http:
        for t in targets:
            for provider, stream in (("codex", True), ("claude", True), ("codex", False)):
                async with http.post(
                    t.base + t.path(provider),
                    data=client_body(provider, stream),
                    headers=request_headers(t, provider),
                ) as r:
                    body = await r.read()
                    if r.status != 200:
                        problems.append(
                            f"{t.name} {provider} stream={stream}: HTTP {r.status} {body[:300]!r}"
                        )
                        continue
                    if stream:
                        terminal = b"response.completed" if provider == "codex" else b"message_stop"
                        if terminal not in body:
                            problems.append(f"{t.name} {provider}: no terminal event")
                    if provider == "claude" and t.name == "kleis" and b'"name":"Shell"' not in body:
                        problems.append("kleis claude: tool name mcp_Shell was not restored to Shell")
    return problems


async def ttfb(targets: list[Target], n: int) -> dict[str, list[float]]:
    """Time to the first body bytes of a Codex stream, concurrency 1, targets interleaved."""
    import aiohttp

    out: dict[str, list[float]] = {t.name: [] for t in targets}
    body = client_body("codex", True)
    async with aiohttp.ClientSession() as http:
        for i in range(n + 20):
            for t in targets:
                url, headers = t.base + t.path("codex"), request_headers(t, "codex")
                start = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as r:
                    await r.content.readany()
                    first = time.perf_counter() - start
                    await r.read()
                if i >= 20:  # warm-up
                    out[t.name].append(first * 1000)
    return out


async def slow_streams(target: Target, pid: int, count: int, delay_ms: int) -> dict:
    """`count` simultaneous slow streams through Kleis; peak RSS and how many finished whole."""
    import aiohttp

    peak = rss_kb(pid)
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kb(pid))
            await asyncio.sleep(0.05)

    results = {"ok": 0, "no_terminal": 0, "status": 0, "error": 0}
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=30)
    half = count // 2
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one(i: int) -> None:
            provider = "codex" if i < half else "claude"
            terminal = b"response.completed" if provider == "codex" else b"message_stop"
            try:
                async with http.post(
                    target.base + target.path(provider),
                    data=client_body(provider, True),
                    headers=request_headers(target, provider, delay_ms),
                ) as r:
                    body = await r.read()
                    if r.status != 200:
                        results["status"] += 1
                        errors.append(f"HTTP {r.status} {body[:200]!r}")
                    elif terminal in body:
                        results["ok"] += 1
                    else:
                        results["no_terminal"] += 1
            except Exception as exc:
                results["error"] += 1
                errors.append(f"{type(exc).__name__}: {exc}")

        sampler = asyncio.create_task(sample())
        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.monotonic() - start
        stop.set()
        await sampler
    return {
        **results,
        "peak_rss_kb": max(peak, 0),
        "hwm_kb": rss_kb(pid, "VmHWM"),
        "elapsed": elapsed,
        "errors": errors[:5],
    }


EXPECTED_USAGE = {  # per request: (input, output, cache_read) as Kleis should count them
    ("codex", True): (1000, 42, 200),
    ("codex", False): (1000, 42, 200),
    ("claude", True): (1200, 57, 200),
}


async def exact_batch(target: Target, n: int, conc: int) -> dict:
    """Exactly `n` requests (codex stream, claude stream, codex JSON in turn), each read to the
    end and checked; returns how many succeeded and the usage Kleis should have counted."""
    import aiohttp

    kinds = list(EXPECTED_USAGE)
    sem = asyncio.Semaphore(conc)
    done = {"ok": 0, "bad": 0, "input": 0, "output": 0, "cache_read": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(i: int) -> None:
            provider, stream = kinds[i % len(kinds)]
            async with (
                sem,
                http.post(
                    target.base + target.path(provider),
                    data=client_body(provider, stream),
                    headers=request_headers(target, provider),
                ) as r,
            ):
                body = await r.read()
            terminal = {
                ("codex", True): b"response.completed",
                ("claude", True): b"message_stop",
                ("codex", False): b'"usage"',
            }[(provider, stream)]
            if r.status == 200 and terminal in body:
                done["ok"] += 1
                tokens = EXPECTED_USAGE[(provider, stream)]
                done["input"] += tokens[0]
                done["output"] += tokens[1]
                done["cache_read"] += tokens[2]
            else:
                done["bad"] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return done


def usage_sums(db_path: Path) -> dict:
    columns = (
        "request_count",
        "success_count",
        "cancelled_count",
        "incomplete_count",
        "server_error_count",
        "client_error_count",
        "auth_error_count",
        "rate_limit_count",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
    )
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        row = db.execute(
            "SELECT " + ", ".join(f"SUM({c})" for c in columns) + " FROM request_usage_buckets"
        ).fetchone()
    return {c: v or 0 for c, v in zip(columns, row, strict=True)}


def summarize_profile(raw: Path, top: int = 25) -> list[str]:
    """Self and inclusive sample shares per frame from py-spy's raw (collapsed) output."""
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + n
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + n
    out = [f"  {total} samples; top self:"]
    out += [
        f"    {100 * n / total:5.1f}%  {f}" for f, n in sorted(selfs.items(), key=lambda kv: -kv[1])[:top]
    ]
    out.append("  top inclusive (kleis.py / providers / aiohttp / sanic frames):")
    keep = [(f, n) for f, n in incl.items() if re.search(r"kleis\.py|providers/|aiohttp/|sanic/|logging/", f)]
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in sorted(keep, key=lambda kv: -kv[1])[:top]]
    return out


def profile(pyspy: str, wrk: Wrk, targets: dict, cells: list[Cell], seconds: int, out_dir: Path, say) -> None:
    """py-spy record (raw + flamegraph) of bare and Kleis under the c=128 cells (not timed)."""
    for cell in cells:
        for name in ("bare", "kleis"):
            t = targets[name]
            stem = out_dir / f"profile-{name}-{cell.name}"
            rec = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "-p",
                    str(t.pid),
                    "-d",
                    str(seconds + 1),
                    "-r",
                    "250",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    f"{stem}.txt",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            time.sleep(0.5)
            r = wrk.run(t, cell, 128, seconds)
            _, err = rec.communicate(timeout=seconds + 30)
            say(f"profile {name} {cell.name} c=128 ({r.rps:.0f} req/s under py-spy): {stem}.txt")
            if rec.returncode != 0 or not Path(f"{stem}.txt").exists():
                say(f"  py-spy failed: {err.decode(errors='replace')[-500:]}")
                continue
            for line in summarize_profile(Path(f"{stem}.txt")):
                say(line)


# ══ Report ══════════════════════════════════════════════════════════════════


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[Result], cell_specs: list[Cell] = ()) -> list[str]:
    cells = {c.name: c for c in cell_specs}
    lines = []
    head = (
        f"{'cell':<14} {'c':>4} {'target':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
        f"{'cpu ms/req':>10} {'proxy%':>6} {'up%':>4} {'gen%':>4} {'mach%':>5} {'ovf':>4} {'err':>4}   kleis/bare"  # noqa: E501 (report text)
    )
    lines += [head, "-" * len(head)]
    by_cell: dict[tuple, dict[str, Result]] = {}
    for r in results:
        by_cell.setdefault((r.cell, r.conc), {})[r.target] = r
    for (cell, conc), group in by_cell.items():
        direct = group.get("direct")
        for name in ("direct", "bare", "kleis"):
            r = group.get(name)
            if r is None:
                continue
            added = r.p50 - direct.p50 if direct and name != "direct" else None
            note = ""
            spec = cells.get(cell)
            if spec is not None and spec.samples and r.cpu_ms_per_req is not None:
                note = f"{r.cpu_ms_per_req / spec.kb:.4f} ms/KB  "
            if name == "kleis" and "bare" in group:
                b = group["bare"]
                thr = r.rps / b.rps if b.rps else float("nan")
                cpu = (r.cpu_ms_per_req / b.cpu_ms_per_req) if b.cpu_ms_per_req else float("nan")
                max_cpu = spec.max_cpu if spec else 1.2
                min_thr = spec.min_thr if spec else 0.85
                ok = "ok" if (min_thr is None or thr >= min_thr) and cpu <= max_cpu else "MISS"
                want = f"cpu<={max_cpu:g}x" + (f" thr>={min_thr:g}x" if min_thr is not None else "")
                note += f"thr {thr:.2f}x  cpu {cpu:.2f}x  {ok} ({want})"
            lines.append(
                f"{cell:<14} {conc:>4} {name:<7} {r.rps:>8.0f} {r.p50:>8.2f} {r.p99:>8.2f} "
                f"{fmt(added):>8} {fmt(r.cpu_ms_per_req, '.3f'):>10} {fmt(r.proxy_cpu_pct, '.0f'):>6} "
                f"{r.upstream_cpu_pct:>4.0f} {r.wrk_cpu_pct:>4.0f} {r.machine_pct:>5.0f} {r.overflows:>4} "
                f"{r.non2xx + r.errors:>4}   {note}"
            )
        lines.append("")
    return lines


# ══ Main ════════════════════════════════════════════════════════════════════


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def write_kleis_config(path: Path, port: int, db: Path, upstream: str) -> str:
    import tomli_w

    admin = "kla_" + secrets.token_hex(16)
    config = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "admin": {"token": admin},
        "security": {"secret_key": secrets.token_urlsafe(24)},
        "database": {"url": f"sqlite:///{db}"},
        "usage": {"flush_interval": 1.0},
        "models": {"source_url": "", "refresh_hours": 0.0},
        "providers": {
            "codex": {"api_url": upstream, "auth_url": upstream, "usage_url": upstream},
            "claude": {
                "api_url": upstream,
                "token_url": upstream + "/v1/oauth/token",
                "usage_url": upstream + "/api/oauth/usage",
            },
            "copilot": {"enabled": False},
        },
    }
    path.write_text(tomli_w.dumps(config))
    return admin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short cells (~90 s in all)")
    parser.add_argument("--duration", type=float, help="seconds per measured cell")
    parser.add_argument("--no-slow", action="store_true", help="skip the 1,000 slow streams check")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, DB)")
    parser.add_argument(
        "--pyspy",
        metavar="PATH",
        help="also profile bare and Kleis with this py-spy binary "
        "(c=128 cells, after the timed ones; output in bench-results/)",
    )
    parser.add_argument(
        "--kleis-dir", default=str(ROOT), help="the Kleis checkout to run (default: this one)"
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk if installed (auto), else 2 aiohttp processes",
    )
    parser.add_argument(
        "--only",
        help="comma-separated cell names to run (default: all): codex-stream, claude-stream, "
        "codex-json, codex-real, claude-real, codex-slow10ms",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run Kleis as this many processes on one socket (CPU counted over all of them)",
    )
    parser.add_argument(
        "--samples",
        default=str(ROOT.parent / "shared" / "data"),
        help="the folder holding opencode-samples/ and client-samples/ (real-size cells; "
        "default ../shared/data; the cells are skipped when it has none)",
    )
    args = parser.parse_args()
    quick = args.quick
    duration = max(1, round(args.duration or (2 if quick else 5)))  # wrk takes whole seconds
    warmup = 1
    concs = (1, 128) if quick else (1, 32, 128)
    cells = [
        Cell("codex-stream", "codex", True),
        Cell("claude-stream", "claude", True),
        Cell("codex-json", "codex", False),
        Cell("codex-slow10ms", "codex", True, delay_ms=10, max_cpu=1.1, min_thr=None),
    ]
    samples_dir = Path(args.samples)
    real = {p: load_samples(samples_dir, p) for p in SAMPLE_SETS}
    for provider, samples in real.items():
        if samples:  # no direct: the fake upstream answers the same whatever the body
            cells.insert(
                3,
                Cell(
                    f"{provider}-real", provider, True, targets=("bare", "kleis"), samples=tuple(samples),
                    concs=(1, 128) if not quick else (128,), max_cpu=1.3, min_thr=None,
                ),
            )  # fmt: skip
    slow_count, slow_delay = 1000, (100 if quick else 200)  # 50 events: ~5 s / ~10 s streams
    fd_limit = raise_fd_limit()

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    tmp = Path(tempfile.mkdtemp(prefix="kleis-bench-"))
    procs = Procs()
    out_lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out_lines.append(line)

    failures: list[str] = []
    t0 = time.monotonic()
    try:
        # ── processes ──
        up_port, bare_port, kleis_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        up = procs.start("upstream", [PY, __file__, "_upstream", str(up_port)], tmp / "upstream.log")
        wait_http(upstream + "/healthz", up, 10, tmp / "upstream.log")
        bare = procs.start(
            "bare", [PY, __file__, "_bare", str(bare_port), upstream], tmp / "bare.log", cwd=ROOT
        )
        config = tmp / "config.toml"
        admin = write_kleis_config(config, kleis_port, tmp / "kleis.db", upstream)
        kleis_start = time.monotonic()
        kleis_dir = Path(args.kleis_dir).resolve()
        command = [PY, str(kleis_dir / "kleis.py")]
        if args.workers > 1:
            command = [PY, __file__, "_workers", str(args.workers), str(kleis_dir)]
        kleis = procs.start(
            "kleis",
            [*command, "serve", "--config", str(config)],
            tmp / "kleis.log",
            cwd=kleis_dir,
        )
        startup = wait_http(f"http://127.0.0.1:{kleis_port}/healthz", kleis, 30, tmp / "kleis.log")
        startup = time.monotonic() - kleis_start
        _wait_port(bare_port, bare, tmp / "bare.log")
        kleis_base = f"http://127.0.0.1:{kleis_port}"
        key = asyncio.run(kleis_setup(kleis_base, admin))
        time.sleep(1.0)
        idle_rss = rss_kb(kleis.pid)
        targets = {
            "direct": Target("direct", upstream, None),
            "bare": Target("bare", f"http://127.0.0.1:{bare_port}", bare.pid),
            "kleis": Target("kleis", kleis_base, kleis.pid, auth=key),
        }
        problems = asyncio.run(smoke(list(targets.values())))
        if problems:
            raise RuntimeError("smoke test failed:\n  " + "\n  ".join(problems))

        say(
            f"Kleis bench  {time.strftime('%Y-%m-%d %H:%M:%S')}  mode={'quick' if quick else 'full'}  "
            f"cell={duration:g}s (+{warmup:g}s warm-up)  cores={os.cpu_count()}  load: "
            f"{'wrk -t1' if args.loadgen != 'python' and shutil.which('wrk') else '2 aiohttp processes'}  "
            f"fd limit={fd_limit}  loadavg {open('/proc/loadavg').read().split()[0]}"
            + (f"  kleis workers={args.workers}" if args.workers > 1 else "")
        )
        say(
            f"Python {sys.version.split()[0]}; upstream: raw asyncio/uvloop fake; bare: Sanic+aiohttp pass-through; "  # noqa: E501 (report text)
            f"request body ~{len(client_body('codex', True)) // 1024} KB; streams: 50 events"
        )
        for c in cells:
            if c.samples:
                say(
                    f"{c.name}: {len(c.samples)} recorded client requests in turn, {c.kb:.1f} KB mean body "
                    f"({', '.join(s.name for s in c.samples)})"
                )
        if not any(c.samples for c in cells):
            say(f"no real-size cells: no samples under {samples_dir}")
        say()

        # ── 1,000 slow streams first: the peak RSS then belongs to them ──
        slow = None
        if not args.no_slow:
            slow = asyncio.run(slow_streams(targets["kleis"], kleis.pid, slow_count, slow_delay))

        # ── TTFB at concurrency 1 ──
        tt = asyncio.run(ttfb(list(targets.values()), 100 if quick else 300))

        # ── load cells ──
        use_wrk = args.loadgen == "wrk" or (args.loadgen == "auto" and shutil.which("wrk"))
        if use_wrk and not shutil.which("wrk"):
            raise SystemExit("wrk not found: apt-get install -y wrk (or --loadgen python)")
        wrk = Wrk(tmp, up.pid) if use_wrk else PyLoad(tmp, up.pid)
        results: list[Result] = []
        if args.only:
            cells = [c for c in cells if c.name in args.only.split(",")]
        for cell in cells:
            for conc in cell.concs or concs:
                if cell.delay_ms and conc == 1:
                    continue
                if cell.delay_ms and quick and conc != 128:
                    continue
                for name in cell.targets:
                    t = targets[name]
                    wrk.run(t, cell, conc, warmup)
                    r = wrk.run(t, cell, conc, duration)
                    results.append(r)
                    print(
                        f"  {cell.name:<14} c={conc:<4} {name:<7} {r.rps:8.0f} req/s  p50 {r.p50:7.2f} ms  "
                        f"cpu {fmt(r.cpu_ms_per_req, '.3f')} ms/req",
                        flush=True,
                    )
        print()

        # ── report ──
        for line in table(results, cells):
            say(line)
        say(
            "columns: +p50 = p50 minus the direct-to-upstream p50; cpu ms/req = proxy process utime+stime over"  # noqa: E501 (report text)
        )
        say(
            "  the cell / requests the generator completed; proxy%/up%/gen% = CPU of the proxy / fake upstream / load generator (100 = one"  # noqa: E501 (report text)
        )
        say(
            "  core); mach% = whole machine busy (100 = all cores, other tenants included); ovf = TCP accept-queue"  # noqa: E501 (report text)
        )
        say("  overflows in the cell (SYN dropped, client retries after 1 s); err = non-2xx + socket errors")
        say()
        tb = {k: statistics.median(v) for k, v in tt.items()}
        t99 = {k: sorted(v)[int(len(v) * 0.99) - 1] for k, v in tt.items()}
        say(
            f"TTFB c=1 (codex stream, first body bytes, n={len(tt['kleis'])}): "
            + "  ".join(f"{k} p50 {tb[k]:.3f} ms p99 {t99[k]:.3f} ms" for k in tt)
            + f"   kleis-bare p50 overhead {tb['kleis'] - tb['bare']:+.3f} ms "
            + ("ok" if tb["kleis"] - tb["bare"] <= 1.0 else "MISS")
            + " (target <= 1 ms)"
        )
        say(
            f"Kleis start-up to first /healthz: {startup:.2f} s "
            + ("ok" if startup <= 1 else "MISS")
            + " (target <= 1 s)"
        )
        say(
            f"Kleis idle RSS after start-up: {idle_rss / 1024:.1f} MB "
            + ("ok" if idle_rss <= 70 * 1024 else "MISS")
            + " (target <= 70 MB)"
        )
        if slow:
            dropped = slow_count - slow["ok"]
            say(
                f"{slow_count} concurrent slow streams through Kleis (50 events x {slow_delay} ms, half codex, half "  # noqa: E501 (report text)
                f"claude): {slow['ok']} completed with terminal event, {dropped} dropped "
                f"(status {slow['status']}, no terminal {slow['no_terminal']}, errors {slow['error']}) in "
                f"{slow['elapsed']:.1f} s; peak RSS {slow['peak_rss_kb'] / 1024:.1f} MB (VmHWM "
                f"{slow['hwm_kb'] / 1024:.1f} MB) "
                + ("ok" if dropped == 0 and slow["peak_rss_kb"] <= 150 * 1024 else "MISS")
                + " (target <= 150 MB, none dropped)"
            )
            for e in slow["errors"]:
                say(f"    e.g. {e}")
        say(f"Kleis RSS after all load: {rss_kb(kleis.pid) / 1024:.1f} MB")

        if args.pyspy:
            out_dir = ROOT / "bench-results"
            out_dir.mkdir(exist_ok=True)
            profile(args.pyspy, wrk, targets, cells, duration, out_dir, say)

        # ── usage counts ──
        # Exact: a fresh batch of N requests, each read to its end, must add exactly N requests,
        # N successes and the tokens the upstream reported to the DB (after >= 2 flush intervals).
        time.sleep(2.5)
        before = usage_sums(tmp / "kleis.db")
        n_exact = 600 if quick else 1500
        batch = asyncio.run(exact_batch(targets["kleis"], n_exact, 32))
        time.sleep(2.5)
        after = usage_sums(tmp / "kleis.db")
        delta = {k: after[k] - before[k] for k in after}
        checks = {
            "request_count": (delta["request_count"], n_exact),
            "success_count": (delta["success_count"], batch["ok"]),
            "input_tokens": (delta["input_tokens"], batch["input"]),
            "output_tokens": (delta["output_tokens"], batch["output"]),
            "cache_read_tokens": (delta["cache_read_tokens"], batch["cache_read"]),
        }
        ok = batch["ok"] == n_exact and all(got == want for got, want in checks.values())
        say(
            f"usage counts (exact batch of {n_exact} requests, {batch['ok']} completed whole per the client): "  # noqa: E501 (report text)
            + ", ".join(f"{k} +{got} (want {want})" for k, (got, want) in checks.items())
            + f"  -> {'OK' if ok else 'MISMATCH'}"
        )
        if not ok:
            failures.append("usage counts")
        # Whole run: every request Kleis saw is counted once; wrk cuts in-flight requests when a
        # cell ends, so some were cancelled (some before their upstream request went out).
        stats = json.loads(http_get(upstream + "/_stats", 5)[1])
        from_kleis = sum(v for k, v in stats.items() if k.startswith("kleis:"))
        total = after
        errors = sum(
            total[k]
            for k in ("server_error_count", "client_error_count", "auth_error_count", "rate_limit_count")
        )
        consistent = total["request_count"] - total["cancelled_count"] <= from_kleis <= total["request_count"]
        say(
            f"usage counts (whole run): SUM(request_count)={total['request_count']} (success "
            f"{total['success_count']}, cancelled at cell ends {total['cancelled_count']}, incomplete "
            f"{total['incomplete_count']}, errors {errors}); upstream received {from_kleis} from Kleis -> "
            + ("OK (requests - cancelled <= upstream <= requests)" if consistent else "MISMATCH")
        )
        if not consistent:
            failures.append("usage totals")
        say(
            f"total bench time {time.monotonic() - t0:.0f} s; logs in {tmp}"
            if args.keep
            else f"total bench time {time.monotonic() - t0:.0f} s"
        )
    except KeyboardInterrupt:
        print("\ninterrupted; stopping processes", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if out_lines:
            results_dir = ROOT / "bench-results"
            results_dir.mkdir(exist_ok=True)
            (results_dir / "latest.txt").write_text("\n".join(out_lines) + "\n")
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20) -> None:
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"port {port}: process exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if time.monotonic() - start > timeout:
            raise RuntimeError(
                f"port {port}: nothing listening after {timeout} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.01)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        run_upstream(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        run_loadgen(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_workers":
        run_workers(int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_bare":
        run_bare(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
