"""The compose file and Dockerfile stay true to the CLI and the repository layout.

No Docker engine runs here, so these check what can be checked without one: every
service command parses with the real CLI, healthchecks probe the readiness endpoint,
and every path the Dockerfile copies exists.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
import yaml

from services.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_compose_commands_parse_with_the_real_cli(name):
    command = COMPOSE["services"][name]["command"]
    assert command[0] in COMMANDS, f"{name}: unknown sub-command {command[0]}"
    parser = argparse.ArgumentParser(exit_on_error=False)
    importlib.import_module(COMMANDS[command[0]][0]).add_arguments(parser)
    args = parser.parse_args(command[1:])
    assert args.host == "0.0.0.0", "containers must listen beyond loopback inside the compose network"


@pytest.mark.parametrize("name", sorted(COMPOSE["services"]))
def test_healthchecks_use_readiness(name):
    service = COMPOSE["services"][name]
    probe = " ".join(service["healthcheck"]["test"])
    port = re.search(r"--port\D+(\d+)", " ".join(service["command"])).group(1)
    assert f"127.0.0.1:{port}/ready" in probe


def test_gateway_points_at_the_other_services():
    command = " ".join(COMPOSE["services"]["gateway"]["command"])
    for name in ("encoder", "lm-worker"):
        port = re.search(r"--port\D+(\d+)", " ".join(COMPOSE["services"][name]["command"])).group(1)
        assert f"http://{name}:{port}" in command
    assert set(COMPOSE["services"]["gateway"]["depends_on"]) == {"encoder", "lm-worker"}


def test_dockerfile_copies_existing_paths():
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
