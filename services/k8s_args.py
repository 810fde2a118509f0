"""The container args of the Kubernetes manifests, rendered from the config dataclasses that `Mesh` uses.

    python -m services.k8s_args            # print each deployment's args
    python -m services.k8s_args --write    # rewrite the args blocks of k8s/base/*.yaml

A test keeps the checked-in manifests equal to what this renders, so an option added to a config class, or
a changed default, reaches Kubernetes too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from services.mesh import AcousticConfig, GatewayConfig, JobsConfig, LLMConfig, Ports

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "k8s" / "base"
MODEL = "/models/vibevoice"  # where the model volume is mounted (k8s/base/model-volume.yaml)
# One A10G per GPU service: its 24 GB hold about 48 ten-minute streams of KV for the 1.5B model
# (`bench/paged_bench.py` prints the plan), so 64 batch rows leave the pool, not the batch, as the limit.
A10G_MAX_STREAMS = 64
DRAIN_GRACE_S = 110.0  # inside the pods' terminationGracePeriodSeconds of 120
JOBS_DATA = "/var/lib/vvmesh/jobs"  # where the jobs StatefulSet mounts its volume (k8s/base/jobs.yaml)

FILES = {
    "text-parser": "text-parser.yaml",
    "acoustic": "acoustic.yaml",
    "llm": "llm.yaml",
    "gateway": "gateway.yaml",
    "jobs": "jobs.yaml",
}


def configs() -> tuple[LLMConfig, AcousticConfig, GatewayConfig]:
    return (
        LLMConfig(max_streams=A10G_MAX_STREAMS, drain_grace=DRAIN_GRACE_S),
        AcousticConfig(max_streams=A10G_MAX_STREAMS),
        GatewayConfig(drain_grace=DRAIN_GRACE_S),
    )


def rendered() -> dict[str, list[str]]:
    """Each deployment's container args: listen on every interface (kubelet probes the pod's address), the
    services' DNS names for their peers, and the config classes' options."""
    p = Ports()
    llm, acoustic, gateway = configs()

    def serving(port: int) -> list[str]:
        return ["--host", "0.0.0.0", "--port", str(port)]

    peers = {"text-parser": f"text-parser:{p.text_parser}", "acoustic": f"acoustic:{p.acoustic}", "llm": f"llm:{p.llm}"}
    peers_args = ["--text-parser", peers["text-parser"], "--acoustic", peers["acoustic"], "--llm", peers["llm"]]
    return {
        "text-parser": [*serving(p.text_parser), "--model", MODEL],
        "acoustic": [*serving(p.acoustic), "--model", MODEL, *acoustic.argv()],
        "llm": [*serving(p.llm), "--model", MODEL, "--acoustic", peers["acoustic"], *llm.argv()],
        "gateway": [*serving(p.gateway), *peers_args, *gateway.argv()],
        "jobs": [*serving(p.jobs), *peers_args, *JobsConfig(data_dir=JOBS_DATA).argv()],
    }


def _item(value: str) -> str:
    return value if yaml.safe_load(value) == value else f'"{value}"'


def rewrite(text: str, args: list[str]) -> str:
    """`text` (one manifest) with its container's `args:` block replaced by `args`, comments elsewhere kept."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("args:"))
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    end = start + 1
    while end < len(lines) and lines[end].startswith(indent + "  ") and lines[end].lstrip().startswith(("- ", "#")):
        end += 1
    block = [f"{indent}args:", *(f"{indent}  - {_item(a)}" for a in args)]
    return "\n".join([*lines[:start], *block, *lines[end:]]) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.k8s_args")
    p.add_argument("--write", action="store_true", help="rewrite the args blocks of k8s/base/*.yaml")
    args = p.parse_args(argv)
    for name, container_args in rendered().items():
        if args.write:
            path = BASE / FILES[name]
            path.write_text(rewrite(path.read_text(), container_args))
        else:
            print(f"{name}: {' '.join(container_args)}")


if __name__ == "__main__":
    main()
