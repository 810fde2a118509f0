"""What is allocated on the GPU at the moment of peak use, grouped by the code that allocated it.

    python bench/paged_bench.py --memory-only --memory-history /tmp/job.pickle
    python bench/memory_peak.py /tmp/job.pickle

Reads the allocator history that `torch.cuda.memory._record_memory_history` recorded, replays its allocations
and frees to find the peak, and sums the blocks live then by the innermost frame of the project's code (and,
with `--torch-frame`, the call into torch beneath it).
"""

from __future__ import annotations

import argparse
import pickle
from collections import Counter
from pathlib import Path

OWN_CODE = ("/services/", "/bench/")


def short(filename: str) -> str:
    """The file and its folder: services/llm/engine.py and services/acoustic/engine.py differ by it."""
    path = Path(filename)
    return f"{path.parent.name}/{path.name}"


def own_frame(frames: list[dict], torch_frame: bool) -> str:
    for i, f in enumerate(frames):
        if any(part in f["filename"] for part in OWN_CODE):
            where = f"{short(f['filename'])}:{f['line']} {f['name']}"
            if torch_frame and i > 0:
                inner = frames[i - 1]
                where += f" <- {short(inner['filename'])}:{inner['line']} {inner['name']}"
            return where
    return "(outside the project: " + (frames[0]["name"] if frames else "no stack") + ")"


def live_at_peak(events: list[dict]) -> tuple[int, dict[int, dict]]:
    """The peak of live bytes and the blocks live then (address -> alloc event)."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: dict[int, dict] = {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return peak, at_peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("snapshot")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--torch-frame", action="store_true")
    args = p.parse_args()
    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    for device, events in enumerate(snapshot["device_traces"]):
        if not events:
            continue
        peak, blocks = live_at_peak(events)
        by_place: Counter[str] = Counter()
        for e in blocks.values():
            by_place[own_frame(e.get("frames", []), args.torch_frame)] += e["size"]
        print(f"device {device}: {peak / 2**30:.3f} GiB live at the peak, in {len(blocks)} blocks")
        for place, size in by_place.most_common(args.top):
            print(f"  {size / 2**30:8.3f} GiB  {place}")


if __name__ == "__main__":
    main()
