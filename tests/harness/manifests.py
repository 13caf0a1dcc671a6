"""Deployment manifests as the deploy tests read them, and the bridge wiring they must have.

:func:`render` renders ``k8s/<overlay>`` as ``kubectl kustomize`` would (for the
features the manifests use); the pod helpers pick containers, volumes and probes
out of the objects; :func:`wiring_problems` says what is wrong between a bridge
and its Envoy (sockets, uids, names, probes), for Kubernetes, Helm and compose alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

import sds
from sds.bridge.config import BridgeConfig, PerCaller, parse_config
from sds.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


VERSION: str = sds.__version__


OUR_IMAGE = f"spiffe-envoy-sds:{VERSION}"


ENVOY_IMAGE = "envoyproxy/envoy"


K8S_VERSIONS = ("1.29", "1.37")


ISTIO_SOCKET = "/var/run/secrets/workload-spiffe-uds/socket"


BUILTIN_NAMES = {"default", "ROOTCA", "ALL"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def path_under(path: str, mount: str) -> str | None:
    try:
        return str(PurePosixPath(path).relative_to(mount))
    except ValueError:
        return None


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


@dataclass
class EnvoyView:
    """What an Envoy bootstrap asks of the bridge: the socket it dials and the names."""

    sds_socket: str
    certificates: set[str]
    validations: set[str]


def envoy_view(config: Mapping[str, Any]) -> EnvoyView:
    """The ``sds`` cluster's pipe path and every SDS secret name the config requests."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    pipes = [value["path"] for key, value in _walk(clusters["sds"]) if key == "pipe"]
    assert len(pipes) == 1, "the sds cluster must have exactly one pipe endpoint"
    certificates = {
        item["name"]
        for key, value in _walk(config)
        if key == "tls_certificate_sds_secret_configs"
        for item in value
    }
    validations = {
        value["name"]
        for key, value in _walk(config)
        if key == "validation_context_sds_secret_config"
    }
    return EnvoyView(pipes[0], certificates, validations)


def names_problems(where: str, config: BridgeConfig, view: EnvoyView) -> list[str]:
    """Secret names Envoy requests that the bridge config cannot serve."""
    policies = {policy.name for policy in config.policies}
    secrets = {secret.name for secret in config.secrets}
    problems = [
        f"{where}: Envoy asks for certificate {name!r}, which the bridge does not serve"
        for name in sorted(view.certificates - {"default"} - secrets)
    ]
    problems += [
        f"{where}: Envoy asks for validation context {name!r}, which the bridge does not serve"
        for name in sorted(view.validations - BUILTIN_NAMES - policies)
        if not name.startswith("spiffe://")
    ]
    return problems


_KUSTOMIZE_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "configMapGenerator",
    "generatorOptions",
}


_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass"}


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` prints, for the features we use.

    Supported: ``resources`` (files and directories), ``namespace``, and
    ``configMapGenerator`` from files (``behavior`` create, replace or merge)
    with ``generatorOptions.disableNameSuffixHash: true``. Anything else fails,
    which keeps the manifests simple enough to read without kustomize.
    """
    spec = load_yaml(directory / "kustomization.yaml")
    unknown = set(spec) - _KUSTOMIZE_KEYS
    assert not unknown, f"{directory}: renderer does not implement {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            objects += render_kustomization(target)
        else:
            objects += [doc for doc in yaml.safe_load_all(target.read_text()) if doc]
    generators = spec.get("configMapGenerator", [])
    if generators:
        options = spec.get("generatorOptions", {})
        assert options == {"disableNameSuffixHash": True}, f"{directory}: stable names only"
    for generator in generators:
        assert set(generator) <= {"name", "files", "behavior"}, generator
        data = {}
        for item in generator["files"]:
            key, _, path = item.rpartition("=")
            data[key or PurePosixPath(path).name] = (directory / path).read_text()
        behavior = generator.get("behavior", "create")
        existing = [
            obj
            for obj in objects
            if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == generator["name"]
        ]
        if behavior == "create":
            assert not existing, f"{directory}: ConfigMap {generator['name']} exists"
            metadata = {"name": generator["name"]}
            objects.append(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
            )
        else:
            assert behavior in ("replace", "merge") and len(existing) == 1, generator
            if behavior == "replace":
                existing[0]["data"] = data
            else:
                existing[0]["data"].update(data)
    namespace = spec.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] == "Namespace":
                assert obj["metadata"]["name"] == namespace, "kustomize would rename it"
            elif obj["kind"] not in _CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def render(overlay: str) -> list[dict[str, Any]]:
    """The rendered objects of ``k8s/<overlay>``, sorted by kind, namespace and name."""
    return sorted(render_kustomization(REPO / "k8s" / overlay), key=object_key)


def pod_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def pod_specs(objects: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"])
        for obj in objects
        if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet")
    ]


def k8s_volume_at(
    where: str, pod: Mapping[str, Any], container: Mapping[str, Any], path: str
) -> tuple[str, str] | None:
    """(volume identity, path inside it) holding ``path`` in ``container``.

    A hostPath is identified by the node path (so two pods on a node share
    it); any other volume by the pod and its name.
    """
    best = None
    for mount in container.get("volumeMounts", []):
        rel = path_under(path, mount["mountPath"])
        if rel is not None and (
            best is None or len(mount["mountPath"]) > len(best[0]["mountPath"])
        ):
            best = (mount, rel)
    if best is None:
        return None
    mount, rel = best
    if mount.get("subPath"):
        rel = str(PurePosixPath(mount["subPath"]) / rel)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    if "hostPath" in volume:
        return f"hostPath:{volume['hostPath']['path']}", rel
    return f"{where}:{volume['name']}", rel


def k8s_mounted_file(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    path: str,
    config_maps: Mapping[str, Mapping[str, Any]],
) -> str:
    """The content of the ConfigMap key mounted at ``path`` in ``container``."""
    parent, name = str(PurePosixPath(path).parent), PurePosixPath(path).name
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    text: str = config_maps[volume["configMap"]["name"]]["data"][name]
    return text


def _security(container: Mapping[str, Any]) -> tuple[int, int]:
    security = container["securityContext"]
    return int(security["runAsUser"]), int(security["runAsGroup"])


def named_container(pod: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    return next((c for c in pod_containers(pod) if c["name"] == name), None)


def bridge_container(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``sds run`` container: our image (from any registry) running ``run``."""
    return next(
        (
            c
            for c in pod_containers(pod)
            if c["image"].rsplit("/", 1)[-1] == OUR_IMAGE and c.get("args", [])[:1] == ["run"]
        ),
        None,
    )


def _probe(container: Mapping[str, Any], kind: str) -> list[str]:
    command: list[str] = container.get(kind, {}).get("exec", {}).get("command", [])
    return command


def _http_probe(container: Mapping[str, Any], kind: str) -> tuple[str, int] | None:
    """(path, container port) of an httpGet probe, a named port resolved; None if not httpGet."""
    get = container.get(kind, {}).get("httpGet")
    if get is None:
        return None
    port = get["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container.get("ports", []) if p["name"] == port)
    return str(get["path"]), int(port)


@dataclass
class Proxy:
    """The Envoy a bridge serves: its pod, container, the socket it dials and the names."""

    where: str
    pod: dict[str, Any]
    container: dict[str, Any]
    socket: str
    certificates: set[str]
    validations: set[str]


def k8s_proxy(where: str, pod: dict[str, Any], config_maps: Mapping[str, Any]) -> Proxy | None:
    """The Envoy (or istio-proxy) in ``pod``, with what it asks of the bridge."""
    istio = named_container(pod, "istio-proxy")
    if istio is not None:
        return Proxy(where, pod, istio, ISTIO_SOCKET, {"default"}, {"ROOTCA"})
    envoy = next((c for c in pod["containers"] if c["image"].startswith(ENVOY_IMAGE + ":")), None)
    if envoy is None:
        return None
    args = envoy["args"]
    config = yaml.safe_load(k8s_mounted_file(pod, envoy, args[args.index("-c") + 1], config_maps))
    view = envoy_view(config)
    return Proxy(where, pod, envoy, view.sds_socket, view.certificates, view.validations)


def wiring_problems(
    where: str,
    pod: dict[str, Any],
    proxy: Proxy,
    config_maps: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    """Everything that would keep the bridge in ``pod`` from serving ``proxy`` (empty: none)."""
    bridge = bridge_container(pod)
    if bridge is None:
        return [f"{where}: no bridge container (image {OUR_IMAGE}, args run ...)"]
    args = bridge["args"]
    text = k8s_mounted_file(pod, bridge, args[args.index("--config") + 1], config_maps)
    try:
        config = parse_config(yaml.safe_load(text), f"{where} sds.yaml")
    except ConfigError as exc:
        return [str(exc)]
    listen = config.listen.path if config.listen is not None else None
    if listen is None:
        return [f"{where}: the bridge config must listen on a Unix socket"]
    problems: list[str] = []
    served = k8s_volume_at(where, pod, bridge, listen)
    dialled = k8s_volume_at(proxy.where, proxy.pod, proxy.container, proxy.socket)
    if served is None or served != dialled:
        problems.append(f"{proxy.where}: dials {proxy.socket} ({dialled}), bridge serves {served}")
    proxy_uid, proxy_gid = _security(proxy.container)
    bridge_gid = _security(bridge)[1]
    if proxy_uid not in config.allowed_uids:
        problems.append(f"{where}: allowed_uids does not name the proxy's uid {proxy_uid}")
    if config.socket_mode != 0o660 or bridge_gid != proxy_gid:
        problems.append(f"{where}: want socket 0660 in the proxy's group {proxy_gid}")
    problems += names_problems(
        proxy.where, config, EnvoyView(proxy.socket, proxy.certificates, proxy.validations)
    )
    # The socket's directory: made by an init container, 0750, the proxy's group.
    maker = named_container(pod, "sds-socket-dir")
    if maker is None or served is None:
        problems.append(f"{where}: no sds-socket-dir init container")
    else:
        command = maker["command"]
        made = k8s_volume_at(where, pod, maker, command[-1])
        if made != (served[0], str(PurePosixPath(served[1]).parent)):
            problems.append(f"{where}: sds-socket-dir makes {command[-1]}, not the socket's dir")
        group = int(command[command.index("-g") + 1]) if "-g" in command else _security(maker)[1]
        if command[command.index("-m") + 1] != "0750" or group != proxy_gid:
            problems.append(f"{where}: the socket's directory must be 0750 in group {proxy_gid}")
    # Probes: the admin endpoint is loopback-only, so they run inside the
    # container, or go over HTTP to the metrics listener when there is one.
    admin = f"{config.admin.host}:{config.admin.port}"
    metrics = config.metrics.port if config.metrics is not None else None
    if _probe(bridge, "startupProbe")[:4] != ["sds", "wait", "--socket", f"unix://{listen}"]:
        problems.append(f"{where}: startupProbe must be `sds wait --socket unix://{listen}`")
    ready = _http_probe(bridge, "readinessProbe")
    if ready is not None:
        if metrics is None or ready != ("/readyz", metrics):
            problems.append(f"{where}: readinessProbe httpGet must be /readyz on the metrics port")
    elif _probe(bridge, "readinessProbe")[:4] != ["sds", "wait", "--admin", admin]:
        problems.append(f"{where}: readinessProbe must be `sds wait --admin {admin}`")
    live = _http_probe(bridge, "livenessProbe")
    if live is not None:
        if metrics is None or live != ("/healthz", metrics):
            problems.append(f"{where}: livenessProbe httpGet must be /healthz on the metrics port")
    elif f"http://{admin}/healthz" not in " ".join(_probe(bridge, "livenessProbe")):
        problems.append(f"{where}: livenessProbe must check http://{admin}/healthz")
    # The proxy starts only once the socket is served.
    init = [c["name"] for c in pod.get("initContainers", [])]
    if proxy.pod is pod:
        if bridge.get("restartPolicy") != "Always" or bridge["name"] not in init:
            problems.append(f"{where}: the bridge must be a native sidecar (init, Always)")
        elif maker is not None and init.index(maker["name"]) > init.index(bridge["name"]):
            problems.append(f"{where}: sds-socket-dir must run before the bridge")
        if proxy.container["name"] in init:
            problems.append(f"{where}: the proxy must not start before the bridge")
    elif not any(
        c.get("args", [])[:3] == ["wait", "--socket", f"unix://{proxy.socket}"]
        for c in proxy.pod.get("initContainers", [])
    ):
        problems.append(f"{proxy.where}: an init container must `sds wait` for the socket")
    if config.per_caller is not None:
        return problems + _per_caller_problems(where, pod, bridge, config.per_caller)
    # The Workload API: the SPIFFE CSI driver's socket, read-only.
    env = {item["name"]: item["value"] for item in bridge.get("env", [])}
    socket = env.get("SPIFFE_ENDPOINT_SOCKET", "")
    mount = k8s_volume_at(where, pod, bridge, socket.removeprefix("unix://"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    csi = volumes.get(mount[0].split(":")[-1], {}).get("csi", {}) if mount else {}
    readonly = [
        m.get("readOnly") for m in bridge["volumeMounts"] if socket[7:].startswith(m["mountPath"])
    ]
    if csi.get("driver") != "csi.spiffe.io" or not csi.get("readOnly") or readonly != [True]:
        problems.append(
            f"{where}: SPIFFE_ENDPOINT_SOCKET must be in a read-only csi.spiffe.io volume"
        )
    return problems


def config_maps_of(objects: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "ConfigMap"}


def _per_caller_problems(
    where: str, pod: Mapping[str, Any], bridge: Mapping[str, Any], per_caller: PerCaller
) -> list[str]:
    """A per-caller bridge: the SPIRE agent's admin socket from a read-only hostPath of its
    own, the host's pids (SO_PEERCRED reports pids of other namespaces as 0), and no
    Workload API."""
    (address, *_) = per_caller.delegated_identity_api
    if not address.startswith("unix:///"):
        return [f"{where}: per_caller.delegated_identity_api must be a unix:/// address"]
    problems = []
    path = address.removeprefix("unix://")
    mount = k8s_volume_at(where, pod, bridge, path)
    mounted = [m for m in bridge["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    if mount is None or not mount[0].startswith("hostPath:") or not mounted:
        problems.append(f"{where}: {path} must be in a hostPath volume (the agent's admin dir)")
    elif any(m.get("readOnly") is not True for m in mounted):
        problems.append(f"{where}: the agent's admin socket directory must be mounted read-only")
    if pod.get("hostPID") is not True:
        problems.append(f"{where}: a per-caller bridge needs hostPID: true to see callers' pids")
    env = {item["name"] for item in bridge.get("env", [])}
    volumes = [
        v for v in pod.get("volumes", []) if v.get("csi", {}).get("driver") == "csi.spiffe.io"
    ]
    if "SPIFFE_ENDPOINT_SOCKET" in env or volumes:
        problems.append(f"{where}: a per-caller bridge uses no Workload API")
    return problems
