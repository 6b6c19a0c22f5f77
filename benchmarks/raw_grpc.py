"""The floor under `bench_rounds`: bare grpc.aio moving the same bytes per round as a threepc run.

    server (this process): for each round, the same `down`-byte blob to every stream,
                           then wait for one `up`-byte blob back from each of the n streams
    worker (n processes):  one bidirectional stream; read a blob, answer with a blob

No protobuf, no numpy, no metering: raw `bytes` messages on the same method shape as threepc's
`Train` (stream-stream, no serializer) and the same raised size limits. A round here is what a
threepc round would cost if the coordinator and the workers did no work at all, so
`threepc rounds/s / raw rounds/s` is the share of the transport's speed that threepc keeps.

    .venv/bin/python -m threepc.benchmarks.raw_grpc --n 8 --down 4000008 --up 80025 --rounds 40

prints one JSON object: rounds_per_s (steady state, after `--warmup` rounds), the server's CPU
seconds per round and its peak RSS. Prints figures only; it never fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence

import grpc

METHOD = "/threepc.bench.Raw/Train"
_END = b""  # an empty message ends a worker's stream


def _options(max_bytes: int) -> list[tuple[str, int]]:
    # The same two options threepc.common.wire.channel_options sets, nothing else.
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


class _Hub:
    """The server's side of n streams: one outbox per stream, one shared inbox of replies."""

    def __init__(self, n: int):
        self.n = n
        self.outboxes: list[asyncio.Queue[bytes | None]] = []
        self.replies: asyncio.Queue[int] = asyncio.Queue()
        self.all_joined = asyncio.Event()

    async def train(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        hello = await context.read()  # the worker's first (empty-ish) message: it is connected
        if hello is grpc.aio.EOF:
            return
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.outboxes.append(outbox)
        if len(self.outboxes) == self.n:
            self.all_joined.set()

        async def read_replies() -> None:
            while (data := await context.read()) is not grpc.aio.EOF:
                self.replies.put_nowait(len(data))

        reader = asyncio.create_task(read_replies())
        try:
            while (blob := await outbox.get()) is not None:
                await context.write(blob)
            await context.write(_END)
            await reader
        finally:
            reader.cancel()


async def _serve(
    n: int, down: int, rounds: int, max_bytes: int, spawn: list[str], worker_cpu: list[float]
) -> list[tuple[float, float]]:
    """Run the server, start the n workers with `spawn + [port]`; (wall, CPU) at each round's end.

    Each worker's CPU seconds after its warm-up rounds are appended to `worker_cpu`.
    """
    hub = _Hub(n)
    server = grpc.aio.server(options=_options(max_bytes))
    handler = grpc.method_handlers_generic_handler(
        "threepc.bench.Raw", {"Train": grpc.stream_stream_rpc_method_handler(hub.train)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    procs = [
        await asyncio.create_subprocess_exec(*spawn, str(port), stdout=asyncio.subprocess.PIPE)
        for _ in range(n)
    ]
    try:
        await hub.all_joined.wait()
        blob = os.urandom(down)
        ends = []
        for _ in range(rounds):
            for outbox in hub.outboxes:
                outbox.put_nowait(blob)
            for _ in range(n):
                await hub.replies.get()
            ends.append((time.perf_counter(), time.process_time()))
        for outbox in hub.outboxes:
            outbox.put_nowait(None)
        for p in procs:
            out, _ = await p.communicate()
            worker_cpu.append(json.loads(out)["cpu_s"])
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await server.stop(1)
    return ends


async def _work(target: str, up: int, max_bytes: int, warmup: int) -> float:
    """One worker: connect, say hello, answer every blob with an `up`-byte blob until the end.

    Returns its CPU seconds from the end of round `warmup - 1` on (the server's timed span).
    """
    reply = os.urandom(up)
    cpu_start, blobs = time.process_time(), 0
    async with grpc.aio.insecure_channel(target, options=_options(max_bytes)) as channel:
        call = channel.stream_stream(METHOD)()
        await call.write(b"\x01")
        while (data := await call.read()) is not grpc.aio.EOF and data != _END:
            blobs += 1
            if blobs == warmup + 1:  # round `warmup - 1` is answered: the timed span starts
                cpu_start = time.process_time()
            await call.write(reply)
        await call.done_writing()
    return time.process_time() - cpu_start


def _vm_hwm_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run(n: int, down: int, up: int, rounds: int, warmup: int) -> dict:
    """One bare run in this process (the server) and n worker processes; its figures."""
    max_bytes = max(down, up) + (1 << 20)
    spawn = [
        sys.executable,
        "-m",
        "threepc.benchmarks.raw_grpc",
        "--worker",
        "--up",
        str(up),
        "--warmup",
        str(warmup),
        "--max-bytes",
        str(max_bytes),
        "--port",
    ]
    worker_cpu: list[float] = []
    ends = asyncio.run(_serve(n, down, rounds, max_bytes, spawn, worker_cpu))
    steady = ends[max(warmup - 1, 0) :]
    rounds_timed = len(steady) - 1
    span = steady[-1][0] - steady[0][0]
    cpu = steady[-1][1] - steady[0][1]
    per_round = [b[0] - a[0] for a, b in itertools.pairwise(steady)]
    return {
        "n": n,
        "down_bytes": down,
        "up_bytes": up,
        "rounds": rounds,
        "warmup": warmup,
        "rounds_per_s": rounds_timed / span if span > 0 else None,
        "median_round_s": statistics.median(per_round) if per_round else None,
        "server_cpu_s_per_round": cpu / rounds_timed,
        "workers_cpu_s_per_round": sum(worker_cpu) / rounds_timed,
        "server_rss_mb": _vm_hwm_mb(),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="raw_grpc", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="worker processes")
    p.add_argument(
        "--down", type=int, default=4_000_000, help="bytes broadcast to each worker per round"
    )
    p.add_argument("--up", type=int, default=40_000, help="bytes each worker sends back per round")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="rounds left out of rounds/s")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-bytes", type=int, default=64 << 20, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cpu = asyncio.run(_work(f"127.0.0.1:{args.port}", args.up, args.max_bytes, args.warmup))
        print(json.dumps({"cpu_s": cpu}))
        return
    if args.rounds <= args.warmup + 1:
        p.error("--rounds must exceed --warmup + 1")
    print(json.dumps(run(args.n, args.down, args.up, args.rounds, args.warmup)))


if __name__ == "__main__":
    main()
