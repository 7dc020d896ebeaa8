"""The gateway's per-streamed-token cost: the engine alone against ``sluice serve``.

    python -m loadtests.bench_stream [--streams 64] [--tokens 128] [--rounds 3]
                                     [--out bench_results/stream] [--py-spy PREFIX]
                                     [--baseline SOURCE_DIR] [--http h11|httptools]
                                     [--model DIR --device cuda --dtype fp8]

The tiny random Mixtral (the tests' model, written once into a temporary directory), or
the checkpoint ``--model`` names on ``--device``, decodes ``--streams`` concurrent greedy chat requests of ``--tokens`` output tokens
three ways, in alternating rounds so that a change in the machine's load hits all three:

``engine step``   ``LLM.step()`` in a loop, nothing else (the engine's own speed)
``engine async``  ``AsyncLLM``: the step loop in its thread, one asyncio consumer per
                  request in this process (what the local plugin sits on)
``gateway``       ``sluice serve`` (a subprocess, the local backend, auth and metering on)
                  over HTTP, streamed (``stream_options.include_usage``), read by a small
                  raw-socket client in this process (cheaper per chunk than httpx)

The engine modes share one ``LLM`` (``engine step`` runs with the ``AsyncLLM`` thread
held off); each gateway loads its own. On a GPU that is two (three with ``--baseline``)
copies of the weights.

``--baseline DIR`` adds a fourth mode, ``baseline``: a second ``sluice serve`` run from
another source tree (``git archive <commit> | tar -x -C DIR``), so that a change is
measured against the code before it under the same load, round by round.

Per mode: the median gap between a stream's consecutive content chunks (for the engine:
outputs that carry text, the first or the last, which are the ones the gateway sends),
completion tokens per second over the round's wall time, and the first-token time.
The ratios gateway / engine are what issue 16 asks to bring within 3% at batch 64.
CPU time per token is the process's (user + system, every thread) over the round: this
process for the engine, the gateway's process for the gateway (the client's is not in it:
its own is reported as ``client``). The event loop's thread is reported on its own (for
the gateway and ``engine async``; for ``engine step`` it is the thread that steps): it is
what competes with the engine's thread for the GIL, and on a small CPU for the cores.
``--py-spy PREFIX`` records the gateway during its rounds (PREFIX.txt, collapsed stacks
per thread: ``py-spy record --format raw --threads``; with ``BENCH_SPY_NATIVE=1`` C frames
too, at a large cost in speed) to show where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from loadtests.bench_gateway import REPO, Stack, environment, free_port

SERVED = "bench"  # the model's name in the gateway
NATIVE = ["--native"] if os.environ.get("BENCH_SPY_NATIVE") else []  # C frames too (slow)
WORDS = ("the quick brown fox jumps over a lazy dog while engineers measure latency and "
         "throughput of a mixture of experts model served behind a multi tenant gateway").split()

CONFIG = """\
[backends.local]
plugin = "local"
[backends.local.options]
model = "{model}"
served_model_name = "{name}"
device = "{device}"
dtype = "{dtype}"
max_num_seqs = {streams}
num_kv_blocks = {blocks}
max_model_len = 1024
[backends.local.pool]
max_concurrency = {concurrency}
queue_size = {concurrency}
"""


def prompt(i: int) -> str:
    return f"[{i}] " + " ".join(WORDS[(k * 7 + i) % len(WORDS)] for k in range(20))


@dataclass
class Stream:
    started: float
    times: list[float]  # arrival of each content chunk
    tokens: int = 0  # completion tokens (the usage chunk; the engine's count)


@dataclass
class Round:
    mode: str
    gap_p50_ms: float
    gap_p90_ms: float
    tok_s: float
    ttft_p50_ms: float
    cpu_us_per_token: float
    loop_us_per_token: float  # the event loop's thread alone (the GIL's other contender)
    loop_sys_us_per_token: float  # of which in the kernel (socket and file writes)
    tokens: int
    wall_s: float
    client_us_per_token: float = 0.0  # this process reading the streams (gateway modes)


def summarize(mode: str, streams: list[Stream], wall: float, cpu_s: float,
              loop_s: tuple[float, float]) -> Round:
    gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:])]
    tokens = sum(s.tokens for s in streams)
    return Round(mode, 1e3 * statistics.median(gaps), 1e3 * statistics.quantiles(gaps, n=10)[8],
                 tokens / wall, 1e3 * statistics.median(s.times[0] - s.started for s in streams),
                 1e6 * cpu_s / tokens, 1e6 * sum(loop_s) / tokens, 1e6 * loop_s[1] / tokens,
                 tokens, wall)


def cpu_s(pid: int, tid: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads), or of one of its threads."""
    stat = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def since(before: tuple[float, float], now: tuple[float, float]) -> tuple[float, float]:
    return now[0] - before[0], now[1] - before[1]


def this_thread_cpu_s() -> tuple[float, float]:
    return cpu_s(os.getpid(), threading.get_native_id())


# ---- the engine alone ------------------------------------------------------------------

def engine_step(llm: Any, prompts: list[list[int]], params: Any) -> Round:
    """LLM.step() in a loop: every output's time is its step's end."""
    began, cpu, loop = time.perf_counter(), time.process_time(), this_thread_cpu_s()
    seqs = {llm.add_request(ids, params).seq_id: Stream(began, []) for ids in prompts}
    while llm.has_unfinished():
        outputs = llm.step()
        now = time.perf_counter()
        for out in outputs:
            s = seqs[out.seq_id]
            if out.text or not s.times or out.finished:
                s.times.append(now)
            s.tokens = out.num_completion_tokens
    return summarize("engine step", list(seqs.values()), time.perf_counter() - began,
                     time.process_time() - cpu, since(loop, this_thread_cpu_s()))


async def engine_async(engine: Any, prompts: list[list[int]], params: Any) -> Round:
    """AsyncLLM, one consumer per request on this event loop."""

    async def one(ids: list[int]) -> Stream:
        s = Stream(time.perf_counter(), [])
        async for out in engine.generate(ids, params):
            if out.text or not s.times or out.finished:
                s.times.append(time.perf_counter())
            s.tokens = out.num_completion_tokens
        return s

    began, cpu, loop = time.perf_counter(), time.process_time(), this_thread_cpu_s()
    streams = await asyncio.gather(*(one(ids) for ids in prompts))
    return summarize("engine async", streams, time.perf_counter() - began,
                     time.process_time() - cpu, since(loop, this_thread_cpu_s()))


# ---- through the gateway ---------------------------------------------------------------

class StreamReader(asyncio.Protocol):
    """One streamed chat completion read as it arrives (a protocol, not a StreamReader: no
    await per chunk, so the client takes little of a small machine's CPU). Every SSE event
    with choices is a content chunk; only the usage chunk is parsed."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.buffer = b""
        self.head = True
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        if self.head:
            head, sep, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            if not head.startswith(b"HTTP/1.1 200"):
                self.fail(RuntimeError(f"gateway answered {head[:300]!r}"))
                return
            self.head = False
        while (cut := self.buffer.find(b"\r\n")) >= 0:  # chunked framing: size, data, CRLF
            size = int(self.buffer[:cut], 16)
            if len(self.buffer) < cut + 2 + size + 2:
                return
            chunk, self.buffer = self.buffer[cut + 2:cut + 2 + size], self.buffer[cut + 4 + size:]
            if size == 0:
                if not self.done.done():
                    self.done.set_result(None)
                return
            for event in chunk.split(b"\n\n"):
                if not event.startswith(b"data: {"):
                    continue
                if b'"usage":{' in event:
                    self.stream.tokens = orjson.loads(event[6:])["usage"]["completion_tokens"]
                if b'"choices":[]' not in event:
                    self.stream.times.append(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionError("the gateway closed the connection mid-stream"))

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def http_stream(port: int, key: str, text: str, tokens: int) -> Stream:
    """One streamed chat completion over a raw HTTP/1.1 connection (chunked body)."""
    body = orjson.dumps({"model": SERVED, "messages": [{"role": "user", "content": text}],
                         "max_tokens": tokens, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}})
    s = Stream(time.perf_counter(), [])
    transport, reader = await asyncio.get_running_loop().create_connection(
        lambda: StreamReader(s), "127.0.0.1", port)
    transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
                    b"content-type: application/json\r\nauthorization: Bearer " + key.encode()
                    + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        await reader.done
    finally:
        transport.close()
    return s


async def gateway_round(gateway: Gateway, streams: int, tokens: int) -> Round:
    pid, port, key = gateway.pid, gateway.gateway_port, gateway.key
    began, cpu, loop = time.perf_counter(), cpu_s(pid), cpu_s(pid, pid)  # uvicorn: loop in main
    client = time.process_time()
    runs = await asyncio.gather(*(http_stream(port, key, prompt(i), tokens) for i in range(streams)))
    r = summarize(gateway.name, runs, time.perf_counter() - began, sum(since(cpu, cpu_s(pid))),
                  since(loop, cpu_s(pid, pid)))
    r.client_us_per_token = 1e6 * (time.process_time() - client) / r.tokens
    return r


class Gateway(Stack):
    """``sluice serve`` with the local backend on the tiny checkpoint (no mock upstream),
    from this checkout or, for a baseline, from another source tree."""

    def __init__(self, name: str, workdir: Path, config: str, http: str | None,
                 source: Path = REPO) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, free_port(), free_port(), http)
        self.name, self.config = name, config
        self.env["PYTHONPATH"] = str(source) + os.pathsep + os.environ.get("PYTHONPATH", "")

    def start(self) -> None:
        (self.workdir / "config.toml").write_text(self.config)
        self.cli("migrate")
        self.cli("tenants", "create", "bench", "--rpm", "1000000", "--tpm", "1000000000")
        self.key = json.loads(self.cli("keys", "create", "--tenant", "bench", "--json"))["key"]
        serve = ["sluice.gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(self.gateway_port)]
        self.gateway = self.spawn("gateway", *serve, *(["--http", self.http] if self.http else []))
        self.wait_ready(f"{self.gateway_url}/readyz", self.gateway, "gateway")

    @property
    def pid(self) -> int:
        assert self.gateway is not None
        return self.gateway.pid


# ---- the run ---------------------------------------------------------------------------

def render(rounds: list[Round]) -> tuple[dict[str, dict[str, float]], str]:
    """Per mode the median over rounds, and the gateway's ratios to the engine."""
    modes: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(r.mode for r in rounds):
        mine = [asdict(r) for r in rounds if r.mode == mode]
        modes[mode] = {k: statistics.median(r[k] for r in mine)
                       for k in ("gap_p50_ms", "gap_p90_ms", "tok_s", "ttft_p50_ms",
                                 "cpu_us_per_token", "loop_us_per_token", "loop_sys_us_per_token",
                                 "client_us_per_token")}
    lines = ["| mode | gap p50 ms | gap p90 ms | tokens/s | first token p50 ms | CPU us/token "
             "| loop thread CPU us/token (system) | client CPU us/token |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {v['gap_p50_ms']:.2f} | {v['gap_p90_ms']:.2f} | {v['tok_s']:,.0f} | "
              f"{v['ttft_p50_ms']:.0f} | {v['cpu_us_per_token']:.0f} | "
              f"{v['loop_us_per_token']:.1f} ({v['loop_sys_us_per_token']:.1f}) | "
              f"{v['client_us_per_token']:.1f} |" for m, v in modes.items()]
    lines.append("")
    for g in ("gateway", "baseline"):
        for base in ("engine step", "engine async"):
            if g in modes and base in modes:
                a, b = modes[g], modes[base]
                lines.append(f"{g} / {base}: gap x{a['gap_p50_ms'] / b['gap_p50_ms']:.3f}, "
                             f"tokens/s x{a['tok_s'] / b['tok_s']:.3f}  ")
    return modes, "\n".join(lines) + "\n"


async def measure(args: argparse.Namespace, llm: Any, gateways: list[Gateway],
                  prompts: list[list[int]], params: Any) -> list[Round]:
    from sluice.engine.async_llm import AsyncLLM

    engine = AsyncLLM(llm)

    async def engine_rounds() -> list[Round]:
        with engine._lock:  # the step loop's thread idle (no warm-up) while we step by hand
            step = engine_step(llm, prompts, params)
        return [step, await engine_async(engine, prompts, params)]

    try:
        for gateway in gateways:
            await gateway_round(gateway, args.streams, 16)  # cold start and warm-up
        await engine_async(engine, prompts, params)
        rounds: list[Round] = []
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(gateways[0].pid), "--rate", "200", "--format", "raw", "--threads", *NATIVE,
                 "--output", f"{args.py_spy}.txt"], stdout=subprocess.DEVNULL)
            await asyncio.sleep(1)
        for i in range(args.rounds):
            # the order turns every round, so that a drift in the machine's load is shared
            order: list[Gateway | None] = [None, *gateways]
            for mode in order if i % 2 == 0 else order[::-1]:
                done = await (engine_rounds() if mode is None
                              else gateway_round(mode, args.streams, args.tokens))
                for r in done if isinstance(done, list) else [done]:
                    rounds.append(r)
                    print(f"round {i}: {r.mode:12} gap p50 {r.gap_p50_ms:6.2f} ms  "
                          f"{r.tok_s:7,.0f} tok/s  CPU {r.cpu_us_per_token:4.0f} us/token, loop "
                          f"{r.loop_us_per_token:5.1f} (sys {r.loop_sys_us_per_token:4.1f})  "
                          f"({r.tokens} tokens)", flush=True)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=60)
        return rounds
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="per-streamed-token cost of the gateway")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench_results/stream", help="path prefix: .json, .md")
    parser.add_argument("--py-spy", help="record the gateway with py-spy to PREFIX.txt")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--http", choices=["h11", "httptools"],
                        help="the gateway's HTTP parser (`sluice serve --http`; default: its own)")
    parser.add_argument("--baseline", type=Path,
                        help="a source tree to run a second gateway from, measured alongside")
    parser.add_argument("--model", type=Path,
                        help="a checkpoint directory (default: the tiny random Mixtral, written here)")
    parser.add_argument("--device", default="cpu", help="the engine's device (cpu, cuda)")
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (auto, bfloat16, fp8, ...)")
    args = parser.parse_args()

    import uvloop

    from sluice.engine.config import PRESETS
    from sluice.engine.llm import LLM
    from sluice.engine.random_checkpoint import write_random_checkpoint
    from sluice.engine.sampling import SamplingParams
    from sluice.gateway.backends.contract import ChatMessage, GenerationRequest
    from sluice.plugins.local_engine import LocalEngineBackend

    env = environment()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-stream-"))
    model_dir = args.model or write_random_checkpoint(workdir / "tiny-mixtral",
                                                      PRESETS["tiny-mixtral"], seed=0)
    engine_opts = {"device": args.device, "dtype": args.dtype, "max_num_seqs": args.streams,
                   "max_model_len": 1024, "num_kv_blocks": args.streams * (1024 // 16)}
    config = CONFIG.format(model=model_dir, name=SERVED, streams=args.streams, device=args.device,
                           dtype=args.dtype, blocks=engine_opts["num_kv_blocks"],
                           concurrency=2 * args.streams)
    gateways = [Gateway("gateway", workdir / "gateway", config, args.http)]
    if args.baseline:
        gateways.append(Gateway("baseline", workdir / "baseline", config, args.http,
                                args.baseline.resolve()))
    try:
        # The same prompt ids the gateway runs (the local backend's chat encoding).
        backend = LocalEngineBackend(LocalEngineBackend.Options(model=str(model_dir), **engine_opts))
        prompts = [backend.prompt_ids(GenerationRequest(f"r{i}", SERVED, messages=(
            ChatMessage("user", prompt(i)),))) for i in range(args.streams)]
        llm = LLM(model_dir, progress=False, **engine_opts)
        params = SamplingParams(temperature=0, max_tokens=args.tokens)
        for gateway in gateways:
            gateway.start()
        rounds = uvloop.run(measure(args, llm, gateways, prompts, params))
    except BaseException:
        for gateway in gateways:
            print(gateway.log_tail("gateway"), file=sys.stderr)
        raise
    finally:
        for gateway in gateways:
            gateway.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    modes, markdown = render(rounds)
    command = "python -m loadtests.bench_stream " + " ".join(sys.argv[1:])
    head = (f"Command: `{command.strip()}` at commit {env['commit']} on {env['cpus']} CPUs "
            f"({env['cpu']}), load average before {env['loadavg_before'][0]:.2f} and after "
            f"{os.getloadavg()[0]:.2f}; {args.streams} streams x {args.tokens} tokens, "
            f"median of {args.rounds} rounds"
            + (f"; baseline from {args.baseline}" if args.baseline else "") + ".\n\n")
    print(head + markdown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command.strip(), "environment": env, "streams": args.streams,
         "tokens": args.tokens, "modes": modes, "rounds": [asdict(r) for r in rounds]}, indent=2))
    out.with_suffix(".md").write_text(head + markdown)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
