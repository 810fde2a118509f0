"""Rewrite k8s/base/envoy-config.yaml from envoy/envoy.yaml: python k8s/sync_envoy_config.py

envoy/envoy.yaml is the source of truth; the ConfigMap carries it with the Kubernetes addresses (listener on
0.0.0.0, gateway cluster STRICT_DNS on the headless `gateway` Service). tests/test_k8s_manifests.py fails
when the two drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "envoy" / "envoy.yaml"
TARGET = ROOT / "k8s" / "base" / "envoy-config.yaml"

HEADER = """\
# Envoy's bootstrap for Kubernetes, generated from envoy/envoy.yaml (the source of truth, validated by
# tests/test_envoy_config.py) by `python k8s/sync_envoy_config.py`; tests/test_k8s_manifests.py checks that
# they agree. Edit envoy/envoy.yaml, then run the script. The differences:
#   - the `public` listener binds 0.0.0.0 (loopback in envoy/envoy.yaml);
#   - the `gateway` cluster is STRICT_DNS on gateway:50061 (STATIC 127.0.0.1:50061 there);
#   - the `jobs` cluster is STRICT_DNS on jobs:50065 (STATIC 127.0.0.1:50065 there);
#   - comments.
# Kept as a manifest, not a configMapGenerator: kustomize refuses files outside the kustomization root
# (../../envoy/envoy.yaml) without --load-restrictor LoadRestrictionsNone.
# The Deployment mounts it at /etc/envoy; a change needs a rollout (kubectl rollout restart deploy/envoy).
apiVersion: v1
kind: ConfigMap
metadata:
  name: envoy-config
  labels:
    app.kubernetes.io/name: envoy
    app.kubernetes.io/part-of: vvmesh
data:
  envoy.yaml: |
"""

# (text in envoy/envoy.yaml, its replacement): each must occur exactly once.
REPLACEMENTS = [
    (
        "        socket_address: {address: 127.0.0.1, port_value: 50051}\n",
        "        # All interfaces: the envoy Service (and kubelet's probes) reach the pod's IP.\n"
        "        socket_address: {address: 0.0.0.0, port_value: 50051}\n",
    ),
    (
        "      type: STATIC\n",
        "      # The gateway Service is headless: DNS returns every ready gateway pod, so Envoy balances\n"
        "      # per call and health-checks and ejects each pod on its own (re-resolved every 5 s).\n"
        "      type: STRICT_DNS\n",
    ),
    (
        "                    socket_address: {address: 127.0.0.1, port_value: 50061}\n",
        "                    socket_address: {address: gateway, port_value: 50061}\n",
    ),
    (
        "      type: STATIC  # STRICT_DNS on the headless `jobs` Service in Kubernetes\n",
        "      # The jobs Service is headless: DNS returns the jobs pod, wherever it restarts.\n"
        "      type: STRICT_DNS\n",
    ),
    (
        "                    socket_address: {address: 127.0.0.1, port_value: 50065}\n",
        "                    socket_address: {address: jobs, port_value: 50065}\n",
    ),
    (
        "                # a fresh x-forwarded-for (tested: tests/test_envoy_config.py).\n",
        "                # a fresh x-forwarded-for (tested: tests/test_envoy_config.py).\n"
        "                # The envoy Service keeps the client's address (externalTrafficPolicy: Local).\n",
    ),
]


def configmap(source: str) -> str:
    """The ConfigMap manifest for an envoy/envoy.yaml text (its header comment is dropped)."""
    body = "admin:\n" + source.split("\nadmin:\n", 1)[1]
    for old, new in REPLACEMENTS:
        if body.count(old) != 1:
            raise ValueError(f"envoy/envoy.yaml changed shape: expected {old.strip()!r} exactly once")
        body = body.replace(old, new)
    lines = body.splitlines(keepends=True)
    return HEADER + "".join("    " + line if line.strip() else "\n" for line in lines)


def main() -> int:
    TARGET.write_text(configmap(SOURCE.read_text()))
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
