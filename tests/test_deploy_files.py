"""The deployment files in deploy/ against the `medfed` CLI and each other, without a container
engine or a cluster: the YAML parses, every command line is one the CLI accepts, each site gets
only its own key and data, and the network rules leave a site one way out (the server's port).
The Helm chart is rendered by the small template evaluator below, which knows exactly the Go
template constructs the chart uses and refuses any other. The nginx config that `medfed server
start` puts in front of the SuperLink (server/proxy.py) is read as a tree and, where nginx is
installed, checked by nginx itself and started once against a stand-in SuperLink."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import ssl
import subprocess
import threading
import time
import tomllib
from pathlib import Path, PurePosixPath

import click
import pytest
import typer
import yaml
from cryptography import x509
from typer.testing import CliRunner

from medfed.cli.main import app
from medfed.common.config_checks import study_classes, validate
from medfed.common.config_loading import load_yaml
from medfed.common.errors import MedfedError
from medfed.common.flower_commands import free_port
from medfed.server import proxy
from medfed.server.certs import CA_CERT, SERVER_CERT, SERVER_KEY, init_certs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "medfed"
TEMPLATES = CHART / "templates"
SITES = ("hospital-a", "hospital-b", "hospital-c")
# What a site receives from `medfed certs init` and mounts; what the server may mount.
SITE_KEYS = {"ca.crt", "node-auth.key"}
SERVER_KEYS = {"ca.crt", "server.crt", "server.key", "sites.yaml"}


# --- the CLI as the containers would call it -------------------------------------------------

def resolve(argv: list[str]) -> tuple[click.Command, list[str], str]:
    """The `medfed` (sub)command that ARGV names, its remaining arguments and its full name."""
    command: click.Command = typer.main.get_command(app)
    args, path = list(argv), "medfed"
    while isinstance(command, click.Group):
        assert args, f"`{path}` needs a subcommand"
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"`{path}` has no subcommand {name!r}"
        command, path = sub, f"{path} {name}"
    return command, args, path


def option_default(argv: list[str], option: str):
    command, _, _ = resolve(argv)
    return next(p.default for p in command.params if option in p.opts)


SERVER_PORT = option_default(["server", "start"], "--port")


def accepted(argv: list[str]) -> dict:
    """ARGV parsed exactly as `medfed` would, without running it: unknown flags, missing required
    options and values of the wrong type fail the test with click's own message."""
    command, args, path = resolve(argv)
    try:
        return command.make_context(path, args).params
    except click.UsageError as exc:
        pytest.fail(f"`medfed {' '.join(argv)}` is refused by the CLI: {exc.format_message()}")


# --- a Helm template evaluator for the constructs the chart uses -----------------------------

ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
WORD = re.compile(r'"(?:[^"\\]|\\.)*"|\||[^\s|]+')


def parse_template(source: str) -> list:
    """Text and actions as a tree: str, ("expr", words), ("if", words, then, else_),
    ("range", words, body). Whitespace trimming ({{- and -}}) is applied here."""
    root: list = []
    stack = [("root", root)]
    position, trim_next = 0, False
    for match in ACTION.finditer(source):
        text = source[position:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        stack[-1][1].append(text)
        position, trim_next = match.end(), bool(match.group(3))
        words = WORD.findall(match.group(2))
        keyword = words[0]
        if keyword in ("if", "range"):
            node = [keyword, words[1:], [], []]
            stack[-1][1].append(node)
            stack.append((keyword, node[2]))
        elif keyword == "else":
            kind, _ = stack.pop()
            assert kind == "if", "{{ else }} outside an if"
            node = stack[-1][1][-1]
            stack.append(("else", node[3]))
        elif keyword == "end":
            kind, _ = stack.pop()
            assert kind != "root", "{{ end }} without an if or range"
        else:
            stack[-1][1].append(("expr", words))
    assert len(stack) == 1, "an if or range without {{ end }}"
    text = source[position:]
    stack[0][1].append(text.lstrip() if trim_next else text)
    return root


def truthy(value) -> bool:
    return value not in (None, False, 0, "", [], {})


def evaluate(words: list[str], scope: dict):
    """A pipeline: TERM or FUNC ARGS..., then `| FUNC ARGS...` with the value as the last arg."""
    segments, current = [], []
    for word in words:
        if word == "|":
            segments.append(current)
            current = []
        else:
            current.append(word)
    segments.append(current)
    value = call(segments[0], scope, piped=())
    for segment in segments[1:]:
        value = call(segment, scope, piped=(value,))
    return value


def call(segment: list[str], scope: dict, *, piped: tuple):
    head, *rest = segment
    args = [term(word, scope) for word in rest] + list(piped)
    if head.startswith((".", '"')) or head.isdigit():
        assert not args, f"{segment} is not a function call"
        return term(head, scope)
    if head == "eq":
        return args[0] == args[1]
    if head == "not":
        return not truthy(args[0])
    if head == "quote":
        return json.dumps(str(args[0]))
    if head == "nindent":
        return "\n" + "\n".join(" " * int(args[0]) + line for line in str(args[1]).split("\n"))
    if head == "required":
        if not truthy(args[1]):
            raise ValueError(args[0])
        return args[1]
    raise AssertionError(f"template function {head!r} is not one this test renders; keep the chart "
                         f"to eq/not/quote/nindent/required, or teach the test")


def term(word: str, scope: dict):
    if word.startswith('"'):
        return json.loads(word)
    if word.isdigit():
        return int(word)
    if word == ".":
        return scope["."]
    value = scope
    for key in word.lstrip(".").split("."):
        assert isinstance(value, dict) and key in value, f"{word} is not defined"
        value = value[key]
    return value


def render_nodes(nodes: list, scope: dict) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "expr":
            value = evaluate(node[1], scope)
            assert not isinstance(value, (dict, list)) and value is not None, \
                f"{' '.join(node[1])} renders a {type(value).__name__}"
            out.append(str(value).lower() if isinstance(value, bool) else str(value))
        elif node[0] == "if":
            branch = node[2] if truthy(evaluate(node[1], scope)) else node[3]
            out.append(render_nodes(branch, scope))
        else:
            items = evaluate(node[1], scope)
            assert isinstance(items, list), f"range over {' '.join(node[1])}, not a list"
            out.extend(render_nodes(node[2], {**scope, ".": item}) for item in items)
    return "".join(out)


def merged(base: dict, overrides: dict) -> dict:
    result = dict(base)
    for key, value in overrides.items():
        result[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return result


def render_chart(overrides: dict, release: str = "study") -> list[dict]:
    """Every manifest `helm template RELEASE deploy/helm/medfed --set ...` would print."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = merged(yaml.safe_load((CHART / "values.yaml").read_text()), overrides)
    scope = {"Values": values, "Release": {"Name": release, "Namespace": "medfed"},
             "Chart": {"Name": chart["name"], "Version": chart["version"],
                       "AppVersion": chart["appVersion"]}}
    documents = []
    for template in sorted(TEMPLATES.glob("*.yaml")):
        text = render_nodes(parse_template(template.read_text()), scope)
        documents += [d for d in yaml.safe_load_all(text) if d is not None]
    return documents


STUDY = (DEPLOY / "study.yaml").read_text()
SERVER_VALUES = {"role": "server", "server": {"study": STUDY, "sites": list(SITES)}}
SITE_VALUES = {"role": "site", "site": {"name": "hospital-a", "superlinkHost": "fl.example.org",
                                        "data": {"claimName": "hospital-a-images"}}}


def by_kind(documents: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in documents]
    assert len(kinds) == len(set(kinds)), f"one resource per kind expected, got {kinds}"
    return {d["kind"]: d for d in documents}


def pod(documents: list[dict]) -> dict:
    """The pod template of the one workload (the server's Job or the site's Deployment)."""
    workloads = [d for d in documents if d["kind"] in ("Job", "Deployment")]
    assert len(workloads) == 1, [d["kind"] for d in documents]
    return workloads[0]["spec"]["template"]


# --- every YAML file --------------------------------------------------------------------------

def test_every_yaml_file_in_deploy_parses():
    files = [p for p in DEPLOY.rglob("*.y*ml") if TEMPLATES not in p.parents]
    assert {p.name for p in files} >= {"compose.yaml", "study.yaml", "Chart.yaml", "values.yaml"}
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), f"{path} is empty"


def test_the_example_study_is_a_valid_study_config():
    config = load_yaml(DEPLOY / "study.yaml")
    validate(config)
    assert len(study_classes(config)) >= 2


# --- Dockerfile -------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def test_dockerfile_builds_medfed_on_python_311_as_a_non_root_user():
    instructions = dockerfile()
    froms = [args for name, args in instructions if name == "FROM"]
    assert len(froms) == 1 and froms[0].startswith("python:3.11"), froms
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the repository is not pip-installed"
    users = [args for name, args in instructions if name == "USER"]
    assert users, "no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    # Numeric: Kubernetes' runAsNonRoot cannot check a user name.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["medfed"]
    # The image's default command (`docker run medfed`) prints the usage and succeeds.
    assert CliRunner().invoke(app, json.loads(dict(instructions)["CMD"])).exit_code == 0
    exposed = {int(p.split("/")[0]) for name, args in instructions if name == "EXPOSE"
               for p in args.split()}
    assert exposed == {SERVER_PORT}, f"EXPOSE {exposed}, the server listens on {SERVER_PORT}"


def test_dockerfile_copies_the_package_and_nothing_else():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    licenses = set(pyproject["project"]["license-files"])
    copied = set()
    for name, args in dockerfile():
        if name in ("COPY", "ADD"):
            assert name == "COPY" and "--from" not in args, args
            copied.update(args.split()[:-1])
    # Certificates, study configs and patient images are mounted at run time, never built in.
    assert copied == packages | licenses | {"pyproject.toml", "README.md"}
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split("\n")
    patterns = [p for p in ignore if p and not p.startswith("#")]
    assert patterns[0] == "**", "the build context must leave everything out unless named"
    assert {p[1:].rstrip("/") for p in patterns if p.startswith("!")} == copied


def test_dockerfile_installs_nginx_for_the_server_role():
    """`medfed server start` runs nginx in front of the SuperLink (server/proxy.py), in the same
    container: Debian's package, installed by root before USER, without recommends or apt lists."""
    instructions = dockerfile()
    runs = [(i, args) for i, (name, args) in enumerate(instructions)
            if name == "RUN" and "nginx" in args]
    assert len(runs) == 1, runs
    index, run = runs[0]
    steps = [step.strip() for step in run.split("&&")]
    installs = [i for i, step in enumerate(steps) if re.search(r"\bapt-get install\b", step)]
    assert len(installs) == 1, steps
    install = steps[installs[0]].split()
    assert "nginx-light" in install and "--no-install-recommends" in install and "-y" in install
    assert any(step.startswith("apt-get update") for step in steps[:installs[0]]), steps
    assert "rm -rf /var/lib/apt/lists/*" in steps[installs[0] + 1:], steps
    users = [i for i, (name, _) in enumerate(instructions) if name == "USER"]
    assert index < users[0], "apt-get needs root: install nginx before USER"


def test_dockerfile_torch_pins_are_pyproject_s():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d for d in dependencies if d.startswith(("torch==", "torchvision=="))}
    runs = " ".join(args for name, args in dockerfile() if name == "RUN")
    assert pins == set(re.findall(r"\btorch(?:vision)?==[\w.]+", runs))


# --- compose.yaml -----------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def command_of(service: dict) -> list[str]:
    assert isinstance(service["command"], list), "exec form, so no shell parses the arguments"
    return [str(arg) for arg in service["command"]]


def mounts(service: dict) -> list[dict]:
    for volume in service.get("volumes", []):
        # Short syntax would let Docker create an empty directory where a key file is missing.
        assert isinstance(volume, dict) and volume["bind"]["create_host_path"] is False, volume
    return service.get("volumes", [])


def site_services() -> dict[str, dict]:
    return {name: s for name, s in SERVICES.items() if command_of(s)[0] == "client"}


def test_compose_runs_one_server_and_the_three_sites():
    servers = [n for n, s in SERVICES.items() if command_of(s)[:2] == ["server", "start"]]
    assert servers == ["server"]
    assert sorted(site_services()) == list(SITES)
    for name, service in site_services().items():
        assert accepted(command_of(service))["site"] == name


def test_compose_commands_are_accepted_by_the_cli():
    for name, service in SERVICES.items():
        params = accepted(command_of(service))
        if name == "server":
            assert params["port"] == SERVER_PORT
            assert not params["insecure"]


def test_compose_sites_dial_the_server_port_over_tls():
    server_port = accepted(command_of(SERVICES["server"]))["port"]
    for service in site_services().values():
        params = accepted(command_of(service))
        host, _, port = params["superlink"].rpartition(":")
        assert (host, int(port)) == ("server", server_port)
        assert not params["insecure"] and params["certs"] is not None


def test_compose_each_site_mounts_only_its_own_key_and_data_read_only():
    for name, service in site_services().items():
        params = accepted(command_of(service))
        volumes = mounts(service)
        assert all(v["read_only"] for v in volumes), f"{name} may write to a mount"
        certs = {v["source"]: v["target"] for v in volumes if "certs" in v["source"]}
        assert certs == {f"./certs/{name}/{key}": f"{params['certs']}/{key}" for key in SITE_KEYS}
        (data,) = [v for v in volumes if "certs" not in v["source"]]
        assert data["target"] == str(params["data"])
        assert data["source"] == f"${{{name.replace('-', '_').upper()}_DATA:-./data/{name}}}"
        assert "ports" not in service and "network_mode" not in service


def test_compose_server_mounts_the_server_keys_and_the_sites_public_keys_only():
    service = SERVICES["server"]
    params = accepted(command_of(service))
    certs = PurePosixPath(str(params["certs"]))
    keys = {str(PurePosixPath(v["target"]).relative_to(certs)): v for v in mounts(service)
            if PurePosixPath(v["target"]).is_relative_to(certs)}
    assert set(keys) == SERVER_KEYS | {f"{site}/node-auth.pub" for site in SITES}
    assert all(v["read_only"] and v["source"] == f"./certs/{k}" for k, v in keys.items())
    study = [v for v in mounts(service) if v["target"] == str(params["config"])]
    assert study and study[0]["source"] == "./study.yaml" and study[0]["read_only"]
    runs = [v for v in mounts(service) if PurePosixPath(str(params["out"])).is_relative_to(v["target"])]
    assert len(runs) == 1 and not runs[0].get("read_only"), "the run directory must be writable"


def test_compose_no_container_runs_as_root_or_sees_the_ca_key():
    for name, service in SERVICES.items():
        assert service.get("user") and not service["user"].startswith(("0:", "root")), name
        assert not any(v["source"].endswith("ca.key") for v in mounts(service)), name


def test_compose_networks_connect_each_site_to_the_server_only():
    networks = COMPOSE["networks"]
    for name, service in site_services().items():
        assert len(service["networks"]) == 1, f"{name} is on several networks"
        network = service["networks"][0]
        assert networks[network]["internal"] is True, f"{network} routes out of the host"
        members = {n for n, s in SERVICES.items() if network in s.get("networks", [])}
        assert members == {name, "server"}, f"{network} joins {members}"


def test_compose_server_healthcheck_probes_the_server_port():
    probe = " ".join(SERVICES["server"]["healthcheck"]["test"])
    assert f"https://127.0.0.1:{SERVER_PORT}/health" in probe


# --- Helm chart -------------------------------------------------------------------------------

def test_chart_templates_reference_only_defined_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for template in TEMPLATES.glob("*"):
        for reference in re.findall(r"\.Values((?:\.\w+)+)", template.read_text()):
            node = values
            for key in reference.strip(".").split("."):
                assert isinstance(node, dict) and key in node, \
                    f"{template.name}: .Values{reference} is not in values.yaml"
                node = node[key]


def test_chart_defaults_match_the_cli():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["port"] == SERVER_PORT
    assert values["site"]["connectTimeout"] == option_default(["client"], "--connect-timeout")
    assert values["server"]["waitSites"] == option_default(["server", "start"], "--wait-sites")


@pytest.mark.parametrize("values", [
    SERVER_VALUES,
    merged(SERVER_VALUES, {"server": {"resume": True, "set": ["federation.rounds=20"], "minSites": 2,
                                      "allowedCIDRs": ["198.51.100.0/24"],
                                      "persistence": {"existingClaim": "study-runs"},
                                      "service": {"type": "LoadBalancer",
                                                  "externalTrafficPolicy": "Local"}}}),
], ids=["new-study", "resume"])
def test_chart_server_role(values):
    documents = render_chart(values)
    kinds = by_kind(documents)
    resume = values["server"].get("resume", False)
    expected = {"Job", "Service", "ConfigMap", "NetworkPolicy"} | ({"PersistentVolumeClaim"}
                                                                   if not resume else set())
    assert set(kinds) == expected
    spec = pod(documents)["spec"]
    container = spec["containers"][0]
    params = accepted(container["args"])
    assert params["port"] == SERVER_PORT == container["ports"][0]["containerPort"]
    assert (params["resume"] is not None) == resume
    # One port, nginx's, and the Service exposes nothing else; the SuperLink is on loopback.
    (port,) = container["ports"]
    (service_port,) = kinds["Service"]["spec"]["ports"]
    assert service_port["port"] == SERVER_PORT and service_port["targetPort"] == port["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["port"] == port["name"]
    secret = next(v["secret"] for v in spec["volumes"] if "secret" in v)
    assert {i["path"] for i in secret["items"]} == SERVER_KEYS | {f"{s}/node-auth.pub" for s in SITES}
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
                 if "persistentVolumeClaim" in v)
    assert claim == (values["server"]["persistence"]["existingClaim"] if resume
                     else kinds["PersistentVolumeClaim"]["metadata"]["name"])
    assert yaml.safe_load(kinds["ConfigMap"]["data"]["study.yaml"]) == yaml.safe_load(STUDY)


@pytest.mark.parametrize("cidr", ["", "203.0.113.7/32"], ids=["in-cluster-server", "remote-server"])
def test_chart_site_role(cidr):
    values = merged(SITE_VALUES, {"site": {"superlinkCIDR": cidr, "gpus": 1}})
    documents = render_chart(values, release="hospital-a")
    assert set(by_kind(documents)) == {"Deployment", "NetworkPolicy"}
    deployment = by_kind(documents)["Deployment"]
    # Two SuperNodes with one key are refused by the SuperLink: never run two at once.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    spec = pod(documents)["spec"]
    container = spec["containers"][0]
    params = accepted(container["args"])
    assert params["site"] == "hospital-a" and not params["insecure"]
    assert params["superlink"] == f"fl.example.org:{SERVER_PORT}"
    secret = next(v["secret"] for v in spec["volumes"] if "secret" in v)
    assert {i["path"] for i in secret["items"]} == SITE_KEYS
    data = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    assert data["persistentVolumeClaim"]["readOnly"] is True
    mounts_by_name = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts_by_name[data["name"]]["readOnly"] is True
    assert str(params["data"]).startswith(mounts_by_name[data["name"]]["mountPath"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("values", [SERVER_VALUES, SITE_VALUES], ids=["server", "site"])
def test_chart_pods_run_as_non_root_with_a_read_only_root(values):
    spec = pod(render_chart(values))["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_chart_site_network_policy_allows_no_ingress_and_egress_only_to_the_server_port():
    for cidr in ("", "203.0.113.7/32"):
        documents = render_chart(merged(SITE_VALUES, {"site": {"superlinkCIDR": cidr}}))
        policy = by_kind(documents)["NetworkPolicy"]["spec"]
        pod_labels = pod(documents)["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in policy["podSelector"]["matchLabels"].items())
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
        assert not policy.get("ingress")
        to_server, dns = policy["egress"]
        assert to_server["ports"] == [{"protocol": "TCP", "port": SERVER_PORT}]
        (peer,) = to_server["to"]
        if cidr:
            assert peer == {"ipBlock": {"cidr": cidr}}
        else:
            assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
        assert {p["port"] for p in dns["ports"]} == {53}
        assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}


def test_chart_server_network_policy_admits_only_the_server_port():
    for cidrs in ([], ["198.51.100.0/24"]):
        documents = render_chart(merged(SERVER_VALUES, {"server": {"allowedCIDRs": cidrs}}))
        policy = by_kind(documents)["NetworkPolicy"]["spec"]
        pod_labels = pod(documents)["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in policy["podSelector"]["matchLabels"].items())
        assert "Ingress" in policy["policyTypes"]
        (rule,) = policy["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": SERVER_PORT}]
        sources = rule.get("from", [])
        assert [s["ipBlock"]["cidr"] for s in sources if "ipBlock" in s] == cidrs
        # In this namespace, with allowedCIDRs set: the medfed site pods (a pilot) and no others.
        pods = [s["podSelector"] for s in sources if "podSelector" in s]
        assert pods == ([{"matchLabels": {"app.kubernetes.io/name": "medfed",
                                          "app.kubernetes.io/component": "site"}}] if cidrs else [])
        assert all(set(s) in ({"ipBlock"}, {"podSelector"}) for s in sources), sources


def test_chart_refuses_to_render_without_the_required_values():
    with pytest.raises(ValueError, match="server.study"):
        render_chart({"role": "server"})
    with pytest.raises(ValueError, match="site.name"):
        render_chart({"role": "site"})


# --- nginx in front of the SuperLink (server/proxy.py) ----------------------------------------

try:
    NGINX: str | None = proxy.nginx_executable()
except MedfedError:
    NGINX = None
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed here (Debian: "
                                                       "apt-get install nginx-light; .ci/run does)")
UPSTREAM_PORT = 41093


def proxy_config(tmp_path: Path, *, tls: bool, port: int = SERVER_PORT,
                 upstream_port: int = UPSTREAM_PORT) -> tuple[Path, Path | None, str]:
    """The run directory's proxy/ folder with nginx.conf as `medfed server start` writes it (real
    certificates from `init_certs`, or none as for --insecure); (folder, certs, text)."""
    certs = None
    if tls:
        certs = tmp_path / "certs"
        init_certs(certs, server_host="fl.example.org", sites=["hospital-a"])
    folder = tmp_path / "run" / "proxy"
    folder.mkdir(parents=True)
    text = proxy.nginx_config(folder=folder, host="0.0.0.0", port=port,
                              upstream_port=upstream_port, certs=certs)
    (folder / "nginx.conf").write_text(text)
    return folder, certs, text


def parse_nginx(text: str) -> list[tuple[str, list[str], list | None]]:
    """nginx.conf as a tree of (directive, arguments, block or None). Quoting and variables are
    not handled: the config is refused if it has any."""
    body = re.sub(r"#[^\n]*", "", text)
    # The one variable medfed uses ($uri) and the Fleet location's end anchor; nothing else.
    plain = body.replace("$uri", "").replace(proxy.FLEET_PATHS, "")
    assert not re.search(r"[\"'$]", plain), "quotes or variables: teach parse_nginx first"
    root: list = []
    stack, words = [root], []
    for token in re.findall(r"[{};]|[^\s{};]+", body):
        if token == ";":
            stack[-1].append((words[0], words[1:], None))
            words = []
        elif token == "{":
            block: list = []
            stack[-1].append((words[0], words[1:], block))
            stack.append(block)
            words = []
        elif token == "}":
            assert not words, f"{words} without ';'"
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return root


def directives(tree: list, name: str) -> list[tuple[str, list[str], list | None]]:
    """Every `name` directive anywhere in the tree."""
    found = []
    for node in tree:
        if node[0] == name:
            found.append(node)
        if node[2] is not None:
            found += directives(node[2], name)
    return found


def names(tree: list) -> set[str]:
    return {node[0] for node in tree} | {n for node in tree if node[2] for n in names(node[2])}


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "insecure"])
def test_proxy_config_routes_only_the_fleet_api_and_health_to_the_superlink(tmp_path, tls):
    folder, certs, text = proxy_config(tmp_path, tls=tls)
    tree = parse_nginx(text)
    (http,) = [node for node in tree if node[0] == "http"]
    (server,) = [node for node in http[2] if node[0] == "server"]
    (listen,) = directives(tree, "listen")
    assert listen[1][0] == f"0.0.0.0:{SERVER_PORT}"
    assert ("ssl" in listen[1]) == tls

    # Exactly three locations, no other way to route or answer (no `if`, `rewrite` or
    # `include`), and nothing but TLS settings beside them in the server block. The Fleet API's
    # location is anchored at both ends and admits single path segments only.
    locations = {tuple(args): block for name, args, block in server[2] if name == "location"}
    assert set(locations) == {("~", proxy.FLEET_PATHS), ("=", proxy.HEALTH_PATH), ("/",)}
    assert proxy.FLEET_PATHS == "^/v1/fleet/[a-z-]+$" and proxy.HEALTH_PATH == "/health"
    assert {name for name, _, _ in server[2]} <= {"listen", "location", "ssl_certificate",
                                                  "ssl_certificate_key", "ssl_protocols"}
    assert not names(tree) & {"if", "rewrite", "include", "load_module", "error_page",
                              "try_files", "alias", "root", "grpc_pass", "fastcgi_pass"}

    # Everything else, the Control API (/v1/control), the Runtime API (/v1/runtime) and the docs
    # included, is answered 403 by nginx and never reaches Flower.
    assert locations[("/",)] == [("return", ["403"], None)]

    scheme = "https" if tls else "http"
    # Forwarded as nginx's normalised path ($uri), never the raw request line.
    upstream = f"{scheme}://127.0.0.1:{UPSTREAM_PORT}$uri"
    assert [args for _, args, _ in directives(tree, "proxy_pass")] == [[upstream], [upstream]]
    for key, method in ((("~", proxy.FLEET_PATHS), "POST"), (("=", proxy.HEALTH_PATH), "GET")):
        block = locations[key]
        (limit,) = [node for node in block if node[0] == "limit_except"]
        assert limit[1] == [method] and limit[2] == [("deny", ["all"], None)], limit
        assert [args for name, args, _ in block if name == "proxy_pass"] == [[upstream]]

    ssl_settings = {name: args for name, args, _ in directives(tree, "ssl_certificate")
                    + directives(tree, "ssl_certificate_key") + directives(tree, "proxy_ssl_verify")
                    + directives(tree, "proxy_ssl_trusted_certificate")
                    + directives(tree, "proxy_ssl_name")}
    if not tls:
        assert not [n for n in names(tree) if n.startswith(("ssl_", "proxy_ssl_"))]
    else:
        # The sites' TLS ends here with the federation's server certificate; the hop to the
        # SuperLink is TLS again, verified against the federation's CA, under a name that the
        # server certificate carries (SuperNode authentication needs TLS on the SuperLink).
        assert ssl_settings["ssl_certificate"] == [str(certs / SERVER_CERT)]
        assert ssl_settings["ssl_certificate_key"] == [str(certs / SERVER_KEY)]
        assert ssl_settings["proxy_ssl_verify"] == ["on"]
        assert ssl_settings["proxy_ssl_trusted_certificate"] == [str(certs / CA_CERT)]
        server_cert = x509.load_pem_x509_certificate((certs / SERVER_CERT).read_bytes())
        dns = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ssl_settings["proxy_ssl_name"][0] in dns.get_values_for_type(x509.DNSName)
        (protocols,) = directives(tree, "ssl_protocols")
        assert set(protocols[1]) <= {"TLSv1.2", "TLSv1.3"}


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "insecure"])
def test_proxy_config_writes_only_inside_the_run_directory(tmp_path, tls):
    """The container's root is read-only: every file nginx writes is in the run directory, and all
    five temp paths are set, so Debian's compiled-in /var/lib/nginx is never used."""
    folder, _, text = proxy_config(tmp_path, tls=tls)
    tree = parse_nginx(text)
    assert [node[1] for node in directives(tree, "daemon")] == [["off"]], "medfed supervises it"
    assert [node[1] for node in directives(tree, "error_log")] == [["stderr", "warn"]]
    temp_paths = {name for name in names(tree) if name.endswith("_temp_path")}
    assert temp_paths == {f"{name}_temp_path" for name in
                          ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for name in ("pid", "access_log", *temp_paths):
        (node,) = directives(tree, name)
        assert Path(node[1][0]).is_relative_to(folder), node
    assert "user" not in names(tree)


@needs_nginx
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "insecure"])
def test_nginx_accepts_the_proxy_config(tmp_path, tls):
    """`nginx -t` exactly as `medfed server start` starts it (-p, -c, -e stderr). `-t` does not
    bind the port. Run as root, nginx also checks that its compiled-in worker user exists, as it
    does at a real start, so a failure here would be one there too. Warnings pass (nginx 1.25 and
    later call `listen ... http2` deprecated); anything worse fails."""
    folder, _, _ = proxy_config(tmp_path, tls=tls)
    result = subprocess.run([NGINX, "-t", "-p", str(folder), "-c", str(folder / "nginx.conf"),
                             "-e", "stderr"], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "test is successful" in output, output
    assert not re.search(r"\[(emerg|alert|crit|error)\]", output), output


class StandInSuperLink(http.server.ThreadingHTTPServer):
    """Answers every request with 200 and remembers (method, path): what got past nginx."""

    def __init__(self, port: int, certs: Path | None):
        seen: list[tuple[str, str]] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                seen.append((self.command, self.path))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", port), Handler)
        if certs is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certs / SERVER_CERT, certs / SERVER_KEY)
            self.socket = context.wrap_socket(self.socket, server_side=True)


@needs_nginx
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "insecure"])
def test_nginx_started_by_medfed_passes_the_fleet_api_and_refuses_the_rest(tmp_path, tls):
    """nginx as `start_proxy` starts it, in front of a stand-in for the loopback SuperLink: the
    sites' calls pass, the Control and Runtime APIs, the docs, other methods and a `..` detour
    get 403 from nginx and never reach the SuperLink."""
    certs = None
    if tls:
        certs = tmp_path / "certs"
        init_certs(certs, server_host="fl.example.org", sites=["hospital-a"])
    port, link_port = free_port(), free_port()
    link = StandInSuperLink(link_port, certs)
    threading.Thread(target=link.serve_forever, daemon=True).start()
    nginx = proxy.start_proxy(folder=tmp_path / "run" / "proxy", host="127.0.0.1", port=port,
                              upstream_port=link_port, certs=certs, log=tmp_path / "proxy.log")
    context = None if certs is None else ssl.create_default_context(cafile=str(certs / CA_CERT))

    def ask(method: str, path: str) -> int:
        connection = (http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
                      if tls else http.client.HTTPConnection("localhost", port, timeout=10))
        try:
            connection.request(method, path, body=b"{}" if method == "POST" else None)
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        deadline = time.monotonic() + 20
        while True:
            assert nginx.running(), nginx.tail()
            try:
                if ask("GET", "/health") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"nginx did not answer: {nginx.tail()}"
            time.sleep(0.2)
        link.seen.clear()
        passed = [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/push-messages"),
                  ("GET", "/health")]
        # nginx resolves encoded dots and slashes first; what it forwards is the resolved path.
        resolved = {("POST", "/v1/control/list-runs/..%2F..%2Ffleet/x"): ("POST", "/v1/fleet/x")}
        refused = [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"),
                   ("POST", "/v1/runtime/pull-task-input"), ("GET", "/docs"),
                   ("GET", "/openapi.json"), ("GET", "/v1/fleet/pull-messages"),
                   ("POST", "/health"), ("POST", "/v1/fleet/../control/list-runs"),
                   ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                   ("POST", "/v1/fleet/pull-messages/x"), ("POST", "/")]
        requests = passed + list(resolved) + refused
        assert {request: ask(*request) for request in requests} == \
            {**{r: 200 for r in passed + list(resolved)}, **{r: 403 for r in refused}}
        assert link.seen == passed + list(resolved.values()), \
            "only the sites' calls may reach the SuperLink"
    finally:
        nginx.stop(grace=5)
        link.shutdown()
        link.server_close()
