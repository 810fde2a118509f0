"""k8s/: the kustomize base and the a10g overlay render to valid Kubernetes objects that keep the mesh whole.

`render` implements the small part of kustomize the manifests use (`resources` and JSON6902 `patches`) so
the tests need no kubectl, and refuses any other kustomization field rather than silently ignoring it;
where kubectl is installed, its built-in kustomize must render the same objects.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services import k8s_args
from services.common.memory import MALLOC_ENV
from services.mesh import ENVOY_CONFIG

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "k8s" / "base"
OVERLAY = ROOT / "k8s" / "overlays" / "a10g"
K8S_VERSION = kubernetes_validate.latest_version()  # the newest schema set the package ships

PORTS = {"gateway": 50061, "text-parser": 50062, "acoustic": 50063, "llm": 50064, "jobs": 50065, "envoy": 50051}
GPU = {"llm", "acoustic"}
A10G_TYPES = [f"g5.{size}" for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")]
A10G_TYPES += ["g5.24xlarge", "g5.48xlarge"]

# --- a tiny kustomize: resources + JSON6902 patches ---


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, parts: list[str]):
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def apply_json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent, last = _parent(doc, parts), parts[-1]
        if op["op"] == "test":
            actual = parent[int(last)] if isinstance(parent, list) else parent[last]
            assert actual == op["value"], f"test failed at {op['path']}: {actual!r} != {op['value']!r}"
        elif op["op"] == "add" and isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        elif op["op"] == "add":
            parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            key = int(last) if isinstance(parent, list) else last
            assert isinstance(parent, list) or key in parent, f"replace of a missing {op['path']}"
            parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[last if isinstance(parent, dict) else int(last)]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    return all(want[k] == v for k, v in target.items())


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{directory}: the test's renderer does not implement {sorted(unsupported)}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text() if "path" in patch else patch["patch"])
        assert isinstance(ops, list), "only JSON6902 patches (a list of ops) are used"
        hits = [i for i, o in enumerate(objects) if _matches(o, patch["target"])]
        assert len(hits) == 1, f"patch target {patch['target']} matched {len(hits)} objects"
        objects[hits[0]] = apply_json6902(objects[hits[0]], ops)
    return objects


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: list[dict]) -> dict[str, dict]:
    """Deployments and StatefulSets (jobs keeps its store on a volume) by name: one pod template each."""
    return {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module", params=["base", "a10g"])
def rendered(request) -> list[dict]:
    return render(BASE if request.param == "base" else OVERLAY)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "a10g"])
def test_render_agrees_with_kubectl_kustomize(directory):
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in render(directory)}
    assert theirs == ours


# --- schema ---


def test_every_object_is_valid_kubernetes(rendered):
    assert tuple(int(x) for x in K8S_VERSION.split(".")[:2]) >= (1, 30)
    for obj in rendered:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_validation_really_checks():
    deployment = by_kind(render(BASE), "Deployment")["llm"]
    container(deployment)["readinessProbe"]["grpc"]["no_such_field"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_patch_applier_handles_pointer_escapes_and_append():
    doc = {"a": {"x/y": [1]}}
    ops = [{"op": "add", "path": "/a/x~1y/-", "value": 2}, {"op": "test", "path": "/a/x~1y/1", "value": 2}]
    assert apply_json6902(doc, ops) == {"a": {"x/y": [1, 2]}}
    assert apply_json6902(doc, [{"op": "replace", "path": "/a/x~1y/0", "value": 3}]) == {"a": {"x/y": [3]}}
    assert apply_json6902(doc, [{"op": "remove", "path": "/a/x~1y"}]) == {"a": {}}
    with pytest.raises(AssertionError):
        apply_json6902(doc, [{"op": "test", "path": "/a/x~1y/0", "value": 3}])
    with pytest.raises(AssertionError):
        apply_json6902(doc, [{"op": "replace", "path": "/a/missing", "value": 3}])


# --- the mesh's shape ---


def test_one_deployment_and_service_per_service(rendered):
    deployments, services = workloads(rendered), by_kind(rendered, "Service")
    assert set(deployments) == set(services) == set(PORTS)
    for name, port in PORTS.items():
        c = container(deployments[name])
        assert [p["containerPort"] for p in c["ports"]] == [port]
        assert [p["port"] for p in services[name]["spec"]["ports"]] == [port]
        assert services[name]["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert services[name]["spec"]["selector"].items() <= labels.items()


def test_services_run_vvmesh_serve_on_their_port(rendered):
    for name, d in workloads(rendered).items():
        c = container(d)
        assert c["image"] == "vvmesh:latest"
        if name == "envoy":
            continue
        assert c["command"] == ["vvmesh", "serve", name.replace("-", "_")]
        args = c["args"]
        assert args[args.index("--port") + 1] == str(PORTS[name])
        assert args[args.index("--host") + 1] == "0.0.0.0"  # probes and peers reach the pod's IP


class _Parsed(Exception):
    pass


def test_service_args_are_accepted_by_the_services(monkeypatch):
    """Each container's args go through the service's own argparse (stopped right after parsing)."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)  # exits (SystemExit) on an unknown or malformed flag
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for d in workloads(render(OVERLAY)).values():
        c = container(d)
        if c["command"][:2] == ["vvmesh", "serve"]:
            with pytest.raises(_Parsed):
                importlib.import_module(f"services.{c['command'][2]}.server").main(c["args"])


def test_service_args_are_the_config_classes_rendered():
    """The base manifests' args are what `python -m services.k8s_args --write` renders from the config classes
    that `Mesh` uses, so a new option or a changed default reaches Kubernetes too."""
    deployments = workloads(render(BASE))
    for name, args in k8s_args.rendered().items():
        assert container(deployments[name])["args"] == args, name
    changed = k8s_args.rewrite((BASE / "llm.yaml").read_text(), ["--host", "0.0.0.0", "--port", "1"])
    deployment = by_kind(list(yaml.safe_load_all(changed)), "Deployment")["llm"]
    assert container(deployment)["args"] == ["--host", "0.0.0.0", "--port", "1"]
    assert "# Args rendered by" in changed  # the comments around the block stay


def test_python_services_carry_the_meshs_glibc_settings():
    for name, d in workloads(render(BASE)).items():
        if name == "envoy":
            continue
        env = {e["name"]: e["value"] for e in container(d)["env"]}
        assert {k: env.get(k) for k in MALLOC_ENV} == MALLOC_ENV, name


def test_every_deployment_has_probes_and_resources(rendered):
    for name, d in workloads(rendered).items():
        c = container(d)
        assert c["readinessProbe"]["grpc"]["port"] == PORTS[name], name
        assert "livenessProbe" in c, name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)


def test_gpu_services_request_a_gpu_and_cpu_services_do_not(rendered):
    for name, d in workloads(rendered).items():
        resources = container(d)["resources"]
        if name in GPU:
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
        else:
            assert "nvidia.com/gpu" not in str(resources), name


def arg(deployment: dict, flag: str) -> str:
    args = container(deployment)["args"]
    return args[args.index(flag) + 1]


def test_llm_and_gateway_drain_for_two_minutes(rendered):
    deployments = by_kind(rendered, "Deployment")
    for name in ("llm", "gateway"):
        assert deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
        # The service's own drain ends (streams get a status) before kubelet's SIGKILL.
        assert float(arg(deployments[name], "--drain-grace")) < 120


def test_envoy_circuit_breaker_is_sized_from_llm_max_streams(rendered):
    d = by_kind(rendered, "Deployment")
    admitted = int(arg(d["llm"], "--max-streams")) + int(arg(d["gateway"], "--queue-size"))
    assert arg(d["acoustic"], "--max-streams") == arg(d["llm"], "--max-streams")
    config = yaml.safe_load(by_kind(rendered, "ConfigMap")["envoy-config"]["data"]["envoy.yaml"])
    gateway = next(c for c in config["static_resources"]["clusters"] if c["name"] == "gateway")
    assert gateway["circuit_breakers"]["thresholds"][0]["max_requests"] == admitted


# --- the a10g overlay ---


def test_overlay_pins_gpu_services_to_a10g():
    deployments = by_kind(render(OVERLAY), "Deployment")
    for name in GPU:
        spec = deployments[name]["spec"]["template"]["spec"]
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        [expression] = terms["nodeSelectorTerms"][0]["matchExpressions"]
        assert expression["key"] == "node.kubernetes.io/instance-type" and expression["operator"] == "In"
        assert expression["values"] == A10G_TYPES
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A10G"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert container(deployments[name])["args"][-4:] == ["--dtype", "bfloat16", "--device", "cuda"]
    base, overlay = workloads(render(BASE)), workloads(render(OVERLAY))
    for name in set(PORTS) - GPU:
        assert overlay[name] == base[name], f"the overlay should leave {name} alone"


# --- envoy's config in the cluster is envoy/envoy.yaml, re-addressed ---


def k8s_envoy_config() -> dict:
    return yaml.safe_load(by_kind(render(BASE), "ConfigMap")["envoy-config"]["data"]["envoy.yaml"])


def test_envoy_configmap_matches_envoy_yaml_but_for_addresses():
    local, k8s = yaml.safe_load(ENVOY_CONFIG.read_text()), k8s_envoy_config()
    listener = next(x for x in k8s["static_resources"]["listeners"] if x["name"] == "public")
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 50051}
    cluster = next(c for c in k8s["static_resources"]["clusters"] if c["name"] == "gateway")
    assert cluster["type"] == "STRICT_DNS"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "gateway", "port_value": 50061}
    jobs = next(c for c in k8s["static_resources"]["clusters"] if c["name"] == "jobs")
    assert jobs["type"] == "STRICT_DNS"
    jobs_endpoint = jobs["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert jobs_endpoint["address"]["socket_address"] == {"address": "jobs", "port_value": 50065}
    assert k8s["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # Put the loopback values back: everything else must be identical.
    listener["address"]["socket_address"]["address"] = "127.0.0.1"
    cluster["type"] = jobs["type"] = "STATIC"
    endpoint["address"]["socket_address"]["address"] = "127.0.0.1"
    jobs_endpoint["address"]["socket_address"]["address"] = "127.0.0.1"
    assert k8s == local


def test_envoy_configmap_is_generated_from_envoy_yaml():
    spec = importlib.util.spec_from_file_location("sync_envoy_config", ROOT / "k8s" / "sync_envoy_config.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    expected = sync.configmap(ENVOY_CONFIG.read_text())
    assert (BASE / "envoy-config.yaml").read_text() == expected, "run: python k8s/sync_envoy_config.py"


def test_envoy_accepts_the_configmap(tmp_path):
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(k8s_envoy_config()))
    binary = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    out = subprocess.run([binary, "--mode", "validate", "-c", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_envoy_deployment_mounts_its_config():
    objects = render(BASE)
    d = by_kind(objects, "Deployment")["envoy"]
    c = container(d)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/envoy")
    volume = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "envoy-config"
    assert c["args"][c["args"].index("-c") + 1] == "/etc/envoy/envoy.yaml"


# --- the jobs store on a volume ---


def test_jobs_keep_their_store_on_a_volume_of_their_own(rendered):
    jobs = by_kind(rendered, "StatefulSet")["jobs"]
    assert jobs["spec"]["replicas"] == 1  # one process owns a store (README, "Jobs")
    assert by_kind(rendered, "Service")[jobs["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    [claim] = jobs["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mount = next(m for m in container(jobs)["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert arg(jobs, "--data-dir") == mount["mountPath"] and not mount.get("readOnly")
