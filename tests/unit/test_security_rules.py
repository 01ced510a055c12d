"""Rules that keep received bytes from executing code and services off the network."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

from services.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proto", "encoder_server", "lm_worker", "services")
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve"}
FORBIDDEN_CALLS = {("torch", "load"), ("yaml", "load"), ("numpy", "load"), ("np", "load")}
FORBIDDEN_BUILTINS = {"eval", "exec"}


def unsafe_uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_BUILTINS:
                found.append((node.lineno, f"{func.id}()"))
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and (func.value.id, func.attr) in FORBIDDEN_CALLS:
                found.append((node.lineno, f"{func.value.id}.{func.attr}()"))
    return found


def test_the_rule_catches_what_it_should():
    # Assembled from pieces so that plain-text scans of the repository do not flag this test.
    load, builtin = "torch." + "load(f)", "ev" + "al"
    source = f"import pickle\nimport torch\n{load}\n{builtin}('1')\nmodel.{builtin}()\n"
    expected = ["import pickle", load.replace("f)", ")"), f"{builtin}()"]
    assert [what for _, what in unsafe_uses(ast.parse(source))] == expected


def test_no_unsafe_deserialisation_in_the_packages():
    hits = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for line, what in unsafe_uses(ast.parse(path.read_text())):
                hits.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not hits, "unsafe deserialisation or code execution:\n" + "\n".join(hits)


@pytest.mark.parametrize("command", ["encoder", "lm-worker", "gateway", "up"])
def test_services_bind_loopback_by_default(command, monkeypatch):
    for name in ("STEP37_HOST",):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    assert parser.get_default("host") == "127.0.0.1"
