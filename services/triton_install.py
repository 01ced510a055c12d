"""Triton from the nvidia-pytriton wheel: finding its files and preparing the backend stub.

The wheel carries a complete Triton 2.51 (the ``tritonserver`` binary, its shared
libraries, the python backend and a backend stub per Python version); only those files
are used, never PyTriton's Python API. The backend stub embeds Python through
``libpython`` rather than running this interpreter, so it is given two things:
``LD_LIBRARY_PATH`` starting with this interpreter's library directory (the same
Python build as the venv), and ``STEP37_TRITON_PYTHONPATH``, which ``model.py`` puts
on its import path — a numpy < 2 first, because the stub's pybind11 reads NumPy 1
array layouts (under NumPy 2 every tensor it hands over is garbage), then the project
and this environment's packages. ``make install`` puts that numpy in ``.venv/triton-numpy``.

Errors::

    RuntimeError
    ├── TritonNotInstalled   the wheel, or a file Triton needs from it, is missing
    └── StubNumpyMissing     NumPy 2 here and no numpy < 2 given for the stub

Both carry the command that fixes them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.triton_repository import PROJECT_ROOT

__all__ = [
    "INSTALL_HINT",
    "PYTHONPATH_ENV",
    "STUB_NUMPY_DIR",
    "StubNumpyMissing",
    "TritonInstall",
    "TritonNotInstalled",
    "find_triton",
    "lay_out_backends",
    "server_environment",
    "stub_python_path",
]

PYTHONPATH_ENV = "STEP37_TRITON_PYTHONPATH"  # read by model.py at import (see its docstring)
INSTALL_HINT = "pip install --no-deps nvidia-pytriton==0.7.0"
STUB_NUMPY_DIR = Path(sys.prefix) / "triton-numpy"
STUB_NUMPY_HINT = f"python -m pip install --no-deps --target {STUB_NUMPY_DIR} 'numpy<2'"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"


class TritonNotInstalled(RuntimeError):
    """The nvidia-pytriton wheel, or a file Triton needs from it, is not there."""


class StubNumpyMissing(RuntimeError):
    """NumPy 2 is installed and no numpy < 2 was given for the backend stub."""


@dataclass(frozen=True)
class TritonInstall:
    """The files of the wheel's Triton that a run needs."""

    server: Path  # bin/tritonserver
    backend: Path  # backends/python/
    stub: Path  # python_backend_stubs/<major.minor>/triton_python_backend_stub
    libraries: Path  # nvidia_pytriton.libs/: libtritonserver and its dependencies


def find_triton() -> TritonInstall:
    """Locate the wheel's Triton without importing PyTriton (its API is not used)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(f"the nvidia-pytriton wheel is not installed: {INSTALL_HINT}")
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(server=root / "bin" / "tritonserver", backend=root / "backends" / "python",
                            stub=root / "python_backend_stubs" / version / _STUB,
                            libraries=package.parent / "nvidia_pytriton.libs")
    needed = [install.server, install.stub, install.libraries, *(install.backend / f for f in _BACKEND_FILES)]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        stubs = sorted(p.name for p in (root / "python_backend_stubs").glob("*")) if root.exists() else []
        raise TritonNotInstalled(f"the nvidia-pytriton wheel lacks {', '.join(missing)} (stubs for Python "
                                 f"{', '.join(stubs) or 'none'}; this is {version}): {INSTALL_HINT}")
    return install


def lay_out_backends(directory: Path, install: TritonInstall) -> Path:
    """``directory/python/`` holding the backend and this Python's stub; returns ``directory``."""
    python = directory / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in _BACKEND_FILES:
        shutil.copy2(install.backend / name, python / name)
    shutil.copy2(install.stub, python / _STUB)  # copy2 keeps the executable bit
    return directory


def stub_python_path(numpy_dirs: Sequence[str]) -> list[str]:
    """Import path for model.py: numpy < 2 first, then the project, then this environment."""
    if _major(importlib.metadata.version("numpy")) >= 2 and not any(_has_numpy_1(d) for d in numpy_dirs):
        given = ", ".join(numpy_dirs) or "none given"
        raise StubNumpyMissing(f"Triton 2.51's python backend stub needs numpy < 2 on its path (its pybind11 "
                               f"reads NumPy 1 arrays) and this environment has NumPy 2 ({given}): "
                               f"{STUB_NUMPY_HINT}, or pass --stub-numpy-dir")
    paths = sysconfig.get_paths()
    entries = [*numpy_dirs, str(PROJECT_ROOT), paths["purelib"], paths["platlib"]]
    return list(dict.fromkeys(entries))  # first occurrence wins, order kept


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


def _has_numpy_1(directory: str) -> bool:
    found = importlib.metadata.distributions(name="numpy", path=[directory])
    return any(_major(dist.version) < 2 for dist in found)


def server_environment(install: TritonInstall, python_path: Sequence[str]) -> dict[str, str]:
    """Environment of tritonserver and, through it, of the backend stub."""
    libraries = [str(install.libraries)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # the stub then embeds this very Python build
        libraries.insert(0, str(sysconfig.get_config_var("LIBDIR")))
    inherited = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*libraries, *([inherited] if inherited else [])]),
            PYTHONPATH_ENV: os.pathsep.join(python_path)}
