"""Where a request's time goes between the services: each trace's spans as one timeline.

    VVMESH_TRACE_CONSOLE=1 python bench/realtime_bench.py --shape 1.5b --streams 1 --playing 0 --arrivals 0
    python bench/span_timeline.py $OUT/logs-realtime-remote --min-spans 6

With VVMESH_TRACE_CONSOLE=1 every service prints its spans (OpenTelemetry's console exporter) into its log. This
reads the logs of a run, groups the spans by trace, and prints each trace's spans in start order: the offset from
the trace's first span, the duration, the service and the call, both the client's side and the server's, and
under a call the moments it marked (the llm's "prompt prefilled" and "first frame", the gateway's "first audio").
A client span that starts well before its server span is time in serialization and transport.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SPAN_START = '{\n    "name"'  # how the console exporter begins each span it prints


@dataclass(frozen=True)
class Span:
    start: float  # seconds since the epoch
    end: float
    service: str
    call: str  # the method's last name: Synthesize, Plan, EncodeVoice, Generate, ...
    kind: str  # SpanKind.CLIENT or SpanKind.SERVER
    trace_id: str
    events: tuple[tuple[float, str], ...]  # (time, name): moments inside the call, such as "first audio"


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def spans_in(text: str, service: str) -> list[Span]:
    """The console-exported spans in one log's text; the lines between them are skipped."""
    decoder = json.JSONDecoder()
    spans, at = [], 0
    while (begin := text.find(SPAN_START, at)) >= 0:
        try:
            span, at = decoder.raw_decode(text, begin)
        except json.JSONDecodeError:  # a span cut short by the end of the run
            at = begin + 1
            continue
        spans.append(
            Span(
                _seconds(span["start_time"]),
                _seconds(span["end_time"]),
                service,
                span["name"].rsplit("/", 1)[-1],
                span.get("kind", ""),
                span["context"]["trace_id"],
                tuple((_seconds(e["timestamp"]), e["name"]) for e in span.get("events", [])),
            )
        )
    return spans


def traces(log_dir: Path) -> list[list[Span]]:
    """Every trace in the logs of `log_dir` (one log per service, named after it), its spans in start order; the
    traces in the order they started."""
    by_trace: dict[str, list[Span]] = defaultdict(list)
    for log in sorted(log_dir.glob("*.log")):
        for span in spans_in(log.read_text(errors="replace"), log.stem):
            by_trace[span.trace_id].append(span)
    return sorted((sorted(s, key=lambda span: span.start) for s in by_trace.values()), key=lambda s: s[0].start)


def timeline(spans: list[Span]) -> str:
    first = spans[0].start
    lines = [f"trace {spans[0].trace_id}"]
    for s in spans:
        side = "client" if s.kind.endswith("CLIENT") else "server"
        at, took = (s.start - first) * 1000, (s.end - s.start) * 1000
        lines.append(f"  {at:9.1f} ms  {took:9.1f} ms  {s.service:12} {side:6} {s.call}")
        lines += [f"  {(t - first) * 1000:9.1f} ms  {'':12} {s.service:12} {side:6}   {name}" for t, name in s.events]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("log_dir", type=Path, help="a run's service logs (e.g. $OUT/logs-realtime-remote)")
    p.add_argument("--min-spans", type=int, default=4, help="skip traces of fewer spans (capacity polls)")
    args = p.parse_args()
    for spans in traces(args.log_dir):
        if len(spans) >= args.min_spans:
            print(timeline(spans))


if __name__ == "__main__":
    main()
