"""Turns the benchmark JSON in bench/results/ into a markdown table and a PNG plot.

python bench/report.py            # prints the table, writes bench/results/engine.png
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def engine_table(data: dict) -> list[str]:
    ref = {r["batch"]: r for r in data["rows"] if r["system"] == "reference"}
    best_ref = max(ref.values(), key=lambda r: r["frames_per_s"])
    lines = [
        f"{data['shape']} shape, random weights, bf16, {data['rows'][0]['frames']} frames, 10 diffusion steps, cfg 1.3",
        "",
        "| system | batch | ms per step | frames/s | real-time factor | peak GiB | vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["system"] == "reference":
            vs = "1.0x" if r is ref.get(1, r) else f"{r['frames_per_s'] / ref[1]['frames_per_s']:.1f}x throughput"
        else:
            vs = (
                f"{ref[1]['ms_per_step'] / r['ms_per_step']:.1f}x latency, "
                f"{r['frames_per_s'] / best_ref['frames_per_s']:.1f}x throughput"
            )
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['frames_per_s']:.0f} | "
            f"{r['real_time_factor']:.3f} | {r['peak_gib']:.1f} | {vs} |"
        )
    m = data.get("memory_batch1")
    if m:
        lines += [
            "",
            f"Peak GPU memory at batch 1: {m['peak_gib']:.2f} GiB = {m['peak_over_weights_plus_kv']:.3f} x "
            f"(weights {m['weights_gib']:.2f} GiB + the stream's KV {m['kv_gib']:.3f} GiB + conv state).",
        ]
    return lines


def mesh_table(data: dict) -> list[str]:
    lines = ["| mesh (through Envoy) | batch | frames/s | ms per step | vs in-process |", "|---|---|---|---|---|"]
    names = {
        "local": "llm + acoustic in one process",
        "remote": "separate processes, gRPC + shared GPU memory",
        "wire": "separate processes, tensors in gRPC messages",
    }
    for mode, entry in data["modes"].items():
        name = names[mode]
        for r in entry["rows"]:
            vs = f"{r['vs_in_process']:.2f}" if "vs_in_process" in r else "1.00"
            lines.append(f"| {name} | {r['batch']} | {r['frames_per_s']:.0f} | {r['ms_per_step']:.1f} | {vs} |")
    lat = data["modes"].get("remote", {}).get("latency")
    if lat:
        a, b = lat["ttfa_alone_ms"], lat["ttfa_with_streams_playing_ms"]
        lines += [
            "",
            "Time to first audio (two-turn script, one 10 s voice): "
            f"alone p50 {a['p50']:.0f} ms, p95 {a['p95']:.0f} ms; "
            f"with {lat['streams_playing']} streams playing p50 {b['p50']:.0f} ms, p95 {b['p95']:.0f} ms. Largest gap "
            f"between chunks of a playing stream while requests arrived: {lat['max_gap_between_chunks_ms']:.0f} ms "
            f"(p99 {lat['p99_gap_between_chunks_ms']:.0f} ms; one frame is 133 ms).",
        ]
    return lines


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for system, marker in (("engine+compile", "^"), ("engine", "o"), ("reference", "s")):
        rows = [r for r in data["rows"] if r["system"] == system]
        if not rows:
            continue
        a.plot([r["batch"] for r in rows], [r["frames_per_s"] for r in rows], marker=marker, label=system)
        b.plot([r["batch"] for r in rows], [r["ms_per_step"] for r in rows], marker=marker, label=system)
    for ax, label in ((a, "frames per second (all streams)"), (b, "ms per step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (streams)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"VibeVoice {data['shape']} shape on {data['gpu']} ({data['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    lines = []
    for shape in ("1.5b", "7b"):
        data = load(f"engine-{shape}")
        if data:
            lines += engine_table(data) + [""]
            if shape == "1.5b":
                plot(data, RESULTS / "engine.png")
                lines += [f"Measured {data['date']} on {data['gpu']}.", ""]
    mesh = load("mesh-1.5b")
    if mesh:
        lines += mesh_table(mesh)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
