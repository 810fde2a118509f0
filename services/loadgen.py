"""`vvmesh load`: many concurrent clients through Envoy, and what they saw.

Each client sends requests back to back (after a rejection it waits a little, as a well-behaved client
would) for a duration or a count. The report: outcomes by status code (and whether each rejection carried a
retry hint), how long rejections took, time to first audio p50/p95/p99, the largest gap between consecutive
chunks of any stream, and frames lost (frames asked for minus frames received, over the streams that
completed), as text, JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_status import rpc_status
from vibevoice.tts.v1 import tts_pb2, tts_pb2_grpc

from services.common.grpc_server import CHANNEL_OPTIONS

REJECTION_BACKOFF_S = 0.2
SCRIPT = "Speaker 1: Hello and welcome.\nSpeaker 2: Thanks, glad to be here."


@dataclass
class Outcome:
    client: int
    status: str
    retry_hint: bool
    frames_expected: int
    frames_received: int
    sent: float
    first_audio: float | None
    chunk_times: list[float] = field(default_factory=list)
    message: str = ""
    ended: float | None = None

    @property
    def ttfa_ms(self) -> float | None:
        return None if self.first_audio is None else (self.first_audio - self.sent) * 1000

    @property
    def max_gap_ms(self) -> float:
        t = self.chunk_times
        return max(((b - a) * 1000 for a, b in zip(t, t[1:], strict=False)), default=0.0)


def _has_retry_hint(err: grpc.aio.AioRpcError) -> bool:
    status = rpc_status.from_call(err)
    if status is not None and any(d.type_url.endswith("google.rpc.RetryInfo") for d in status.details):
        return True
    # Envoy's rate limiter says when its bucket refills
    return any(k in ("x-ratelimit-reset", "retry-after") for k, _ in (err.trailing_metadata() or ()))


async def one_request(stub, client: int, frames: int, api_key: str | None, timeout: float | None) -> Outcome:
    request = tts_pb2.SynthesizeRequest(
        text=SCRIPT,
        format=tts_pb2.AUDIO_FORMAT_PCM16,
        options=tts_pb2.GenerationOptions(seed=random.getrandbits(32), fixed_frames=frames),
    )
    metadata = (("x-api-key", api_key),) if api_key else None
    out = Outcome(client, "OK", False, frames, 0, time.perf_counter(), None)
    last_index = -1
    try:
        async for response in stub.Synthesize(request, metadata=metadata, timeout=timeout):
            if response.WhichOneof("event") == "audio" and response.audio.data:
                now = time.perf_counter()
                if response.audio.frame_index != last_index + 1:
                    out.message = f"frame {response.audio.frame_index} after {last_index}"
                    out.status = "OUT_OF_ORDER"
                last_index = response.audio.frame_index
                out.first_audio = out.first_audio or now
                out.chunk_times.append(now)
                out.frames_received += 1
    except grpc.aio.AioRpcError as e:
        out.status, out.message, out.retry_hint = e.code().name, e.details() or "", _has_retry_hint(e)
    out.ended = time.perf_counter()
    return out


async def run_load(
    address: str,
    clients: int,
    frames: int,
    duration_s: float | None = None,
    count: int | None = None,
    api_key: str | None = None,
    timeout: float | None = 300.0,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + duration_s if duration_s else None
    remaining = [count] if count else None

    def more() -> bool:
        if remaining is not None:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True
        return time.perf_counter() < deadline

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)

        async def client(i: int) -> None:
            while more():
                out = await one_request(stub, i, frames, api_key, timeout)
                outcomes.append(out)
                if out.status != "OK":
                    await asyncio.sleep(REJECTION_BACKOFF_S)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if p == 0.5:
        return statistics.median(values)
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def summarize(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.status == "OK"]
    ttfa = [o.ttfa_ms for o in ok if o.ttfa_ms is not None]
    rejected = [o for o in outcomes if o.status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") and o.frames_received == 0]
    refusal = [(o.ended - o.sent) * 1000 for o in rejected if o.ended is not None]
    return {
        "requests": len(outcomes),
        "by_status": dict(Counter(o.status for o in outcomes)),
        "rejections_with_retry_hint": sum(o.retry_hint for o in rejected),
        "rejections": len(rejected),
        "rejection_ms": {"p50": _percentile(refusal, 0.5), "p99": _percentile(refusal, 0.99)},
        "ttfa_ms": {"p50": _percentile(ttfa, 0.5), "p95": _percentile(ttfa, 0.95), "p99": _percentile(ttfa, 0.99)},
        "max_gap_ms": max((o.max_gap_ms for o in ok), default=0.0),
        "frames_lost": sum(o.frames_expected - o.frames_received for o in ok),
        "frames_received": sum(o.frames_received for o in outcomes),
    }


def write_report(outcomes: list[Outcome], out_dir: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(outcomes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "load.json").write_text(
        json.dumps({"summary": summary, "outcomes": [asdict(o) | {"chunk_times": []} for o in outcomes]}, indent=1)
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ttfa = [o.ttfa_ms for o in outcomes if o.ttfa_ms is not None]
    a.hist(ttfa, bins=30)
    a.set_xlabel("time to first audio (ms)")
    a.set_ylabel("streams")
    counts = summary["by_status"]
    b.bar(list(counts), list(counts.values()))
    b.set_ylabel("requests")
    b.set_title(f"max gap {summary['max_gap_ms']:.0f} ms, frames lost {summary['frames_lost']}")
    fig.tight_layout()
    fig.savefig(out_dir / "load.png", dpi=100)
    plt.close(fig)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"requests: {s['requests']}"]
    lines += [f"  {status}: {n}" for status, n in sorted(s["by_status"].items())]
    lines.append(f"rejections with a retry hint: {s['rejections_with_retry_hint']} of {s['rejections']}")
    r = s["rejection_ms"]
    if r["p50"] is not None:
        lines.append(f"time to a rejection: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms")
    t = s["ttfa_ms"]
    if t["p50"] is not None:
        lines.append(f"time to first audio: p50 {t['p50']:.0f} ms, p95 {t['p95']:.0f} ms, p99 {t['p99']:.0f} ms")
    lines.append(f"largest gap between chunks: {s['max_gap_ms']:.0f} ms; frames lost: {s['frames_lost']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vvmesh load")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--frames", type=int, default=40, help="fixed_frames per request (needs --allow-fixed-frames)")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: --count requests)")
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("-o", "--out", default="out/load")
    args = p.parse_args(argv)
    if args.duration is None and args.count is None:
        args.count = args.clients * 4
    outcomes = asyncio.run(run_load(args.address, args.clients, args.frames, args.duration, args.count, args.api_key))
    print(format_summary(write_report(outcomes, Path(args.out))))
    print(f"report: {args.out}/load.json, {args.out}/load.png")
    return 0
