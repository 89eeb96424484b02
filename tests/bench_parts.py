"""What Kleis's own code costs per request, step by step (issue 14: "what work remains per
request and why it cannot go").

Run:  .venv/bin/python tests/bench_parts.py [--samples DIR] [--rounds N]
(`make bench` runs it after the HTTP cells.) Not collected by pytest.

`tests/bench.py` measures whole requests through real processes, where the load generator, the
fake upstream and both proxies share two cores and the numbers move ±15% between runs. This
times, in one process and without I/O, each step Kleis adds to a request on top of what a bare
pass-through does, with the real code (a real Instance on a temp SQLite file, the real
adapters) on the bench's workloads: the small bench bodies and the recorded client requests.
Each step runs `rounds` times per body; the table gives µs per request (median of 5 runs).

  key       presented_key + Keys.authenticate + the lockout check
  parse     parse_proxy_body: the client's JSON (orjson)
  admit     model prefix and scopes, client_headers' copy of the headers, ProxyRequest
  prepare   the adapter's prepare(): body rewrites, serialised once, identity headers
  response  the adapter's transformer over the upstream's answer (SSE framing, usage, tool
            names restored; the collected JSON answer for codex-json), in the chunks the
            fake upstream sends
  record    usage queue, metrics, one access-log line (to a null stream)

"cold" parses each body after evicting the CPU caches (a 16 MB write), as a request meets a
server busy with other connections: the figure the py-spy profiles under load agree with.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import bench  # noqa: E402 (the HTTP bench's workloads and samples)

import kleis  # noqa: E402
from accounts import import_body  # noqa: E402
from keys import presented_key  # noqa: E402
from providers import ProxyRequest  # noqa: E402
from providers._sse import split_events  # noqa: E402
from settings import load_settings, setup_logging  # noqa: E402
from usage import Outcome  # noqa: E402

STEPS = ("key", "parse", "admit", "prepare", "response", "record")


class Body:
    """One request of a workload: its route, headers, bytes and the upstream's answer."""

    def __init__(self, provider: str, endpoint: str, headers: dict, raw: bytes, answer: bytes):
        self.provider, self.endpoint, self.raw, self.answer = provider, endpoint, raw, answer
        self.headers = {k.lower(): v for k, v in headers.items()}


def workloads(samples: Path) -> dict[str, list[Body]]:
    # The fake upstream writes a fast answer with one write, so Kleis reads it in one chunk
    # or two; `per event` below feeds a stream one event per chunk, as a slow one arrives.
    codex_stream, claude_stream = b"".join(bench.codex_events()), b"".join(bench.claude_events())
    anthropic = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    json_headers = {"content-type": "application/json"}
    small = {
        "codex-stream": ("codex", "responses", json_headers, True, codex_stream),
        "claude-stream": ("claude", "messages", anthropic, True, claude_stream),
        "codex-json": ("codex", "responses", json_headers, False, codex_stream),
    }
    out = {
        cell: [Body(provider, endpoint, hdrs, bench.client_body(provider, stream), answer)]
        for cell, (provider, endpoint, hdrs, stream, answer) in small.items()
    }
    for name, provider, endpoint, answer in (
        ("codex-real", "codex", "responses", codex_stream),
        ("claude-real", "claude", "messages", claude_stream),
    ):
        found = bench.load_samples(samples, provider)
        if found:
            out[name] = [
                Body(provider, endpoint, {**json_headers, **s.headers}, s.body, answer) for s in found
            ]
    return out


async def open_instance(tmp: Path) -> tuple[kleis.Instance, str]:
    config = tmp / "config.toml"
    config.write_text(
        f'[security]\nsecret_key = "{secrets.token_urlsafe(24)}"\n'
        f'[database]\nurl = "sqlite:///{tmp}/kleis.db"\n[models]\nsource_url = ""\n'
        "[providers.copilot]\nenabled = false\n"
    )
    instance = kleis.Instance(load_settings(config, env={}))
    await instance.open()
    for provider, payload in bench.bench_accounts().items():
        await import_body(instance.pool, instance.providers[provider], payload, instance.clock.now())
    await instance.pool.load()
    key, _ = await instance.keys.create(label="bench")
    return instance, key


class FakeResponseHeaders(dict):
    """The upstream's response headers as the adapters read them (a case-insensitive get)."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


def timed(fn, rounds: int) -> float:
    """µs per call: median of 5 runs of `rounds` calls."""
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(rounds):
            fn()
        runs.append((time.perf_counter() - t) / rounds * 1e6)
    return statistics.median(runs)


def measure(instance: kleis.Instance, key: str, bodies: list[Body], rounds: int) -> dict[str, float]:
    """Each step's µs per request, averaged over `bodies`."""
    access = kleis.AccessLog("text")
    access.log = logging.getLogger("kleis.bench-parts")
    access.log.propagate = False
    access.log.handlers = [logging.StreamHandler(io.StringIO())]
    access.log.setLevel(logging.INFO)
    totals = dict.fromkeys((*STEPS, "parse cold", "per event"), 0.0)
    for body in bodies:
        for name, value in measure_one(instance, key, body, access, rounds).items():
            totals[name] += value
    return {name: value / len(bodies) for name, value in totals.items()}


def measure_one(
    instance: kleis.Instance, key: str, body: Body, access: kleis.AccessLog, rounds: int
) -> dict[str, float]:
    proxy, provider = instance.proxy, instance.providers[body.provider]
    headers = {**body.headers, "authorization": f"Bearer {key}"}
    request = SimpleNamespace(headers=headers)  # all client_headers reads of a Sanic request
    account = next(a for a in instance.pool.accounts.values() if a.provider == body.provider)
    prefixes = tuple(provider.module.PREFIXES)
    upstream_headers = FakeResponseHeaders(
        {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
    )
    parsed = kleis.parse_proxy_body(body.raw)
    preq = ProxyRequest(endpoint=body.endpoint, headers=dict(headers), query="", body=parsed, api_key_id="k")
    events = split_events(body.answer)
    outcome = Outcome(key_id="k", provider=body.provider, endpoint=body.endpoint, model="m")
    outcome.status, outcome.source, outcome.ttfb_ms, outcome.duration_ms = 200, "upstream", 1, 2
    junk = bytearray(16 << 20)

    def key_step():
        proxy.lockout.retry_after("127.0.0.1")
        instance.keys.authenticate(presented_key(headers))

    def parse_step():
        kleis.parse_proxy_body(body.raw)

    def admit_step():
        b = dict(parsed)
        model = b["model"].strip()
        kleis.discovery.model_allowed(model, prefixes, None)
        b["model"] = kleis.discovery.strip_prefix(model, prefixes)
        copied = kleis.client_headers(request)
        ProxyRequest(endpoint=body.endpoint, headers=copied, query="", body=b, api_key_id="k")

    def prepare_step():
        provider.module.prepare(provider.ctx, account.adapter_view(), preq)

    def response_step(chunks=(body.answer,)):
        t = provider.module.transformer(provider.ctx, preq, 200, upstream_headers)
        for chunk in chunks:
            t.feed(chunk)
        t.close()

    def record_step():
        instance.usage.record(outcome)
        instance.metrics.observe(outcome)
        access._emit("POST", "/v1/responses", 200, "bench", "bench-codex", "m", 1, 2, (1, 2, 3, 4), "ok")

    def cold_parse():
        junk[:] = bytes(len(junk))
        t = time.perf_counter()
        kleis.parse_proxy_body(body.raw)
        return time.perf_counter() - t

    steps = (key_step, parse_step, admit_step, prepare_step, response_step, record_step)
    out = {name: timed(fn, rounds) for name, fn in zip(STEPS, steps, strict=True)}
    out["parse cold"] = statistics.median(cold_parse() for _ in range(40)) * 1e6
    out["per event"] = 0.0
    if preq.stream:
        per_event = timed(lambda: response_step(events), rounds)
        out["per event"] = (per_event - out["response"]) / (len(events) - 1)
    return out


async def run(samples: Path, rounds: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        instance, key = await open_instance(Path(tmp))
        try:
            rows = []
            for cell, bodies in workloads(samples).items():
                kb = sum(len(b.raw) for b in bodies) / len(bodies) / 1024
                parts = measure(instance, key, bodies, rounds)
                rows.append((cell, kb, parts))
        finally:
            await instance.close()
    head = f"{'cell':<14} {'body KB':>7} " + " ".join(f"{s:>8}" for s in STEPS)
    head += f" {'sum':>7} {'parse cold':>10} {'per event':>9}"
    title = "Kleis's own work per request, µs (one process, no I/O; median of 5 runs)"
    lines = [title, head, "-" * len(head)]
    for cell, kb, parts in rows:
        total = sum(parts[s] for s in STEPS)
        per_event = f"{parts['per event']:.2f}" if parts["per event"] else "-"
        lines.append(
            f"{cell:<14} {kb:>7.1f} "
            + " ".join(f"{parts[s]:>8.1f}" for s in STEPS)
            + f" {total:>7.1f} {parts['parse cold']:>10.1f} {per_event:>9}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    setup_logging("warning")  # as the server runs: what it sets decides a log record's cost
    for line in asyncio.run(run(Path(args.samples), args.rounds)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
