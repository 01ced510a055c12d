"""The whole system: encoder, LM worker and gateway as real processes on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.demo.pipeline import InProcessCaptioner
from services.launcher import BUNDLED_MODEL, Stack, StackConfig


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (BUNDLED_MODEL / "config.json").exists():
        pytest.fail(f"the bundled model is missing at {BUNDLED_MODEL}; train it with `step37-serve train-demo`")
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def stack(model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    """One system for the session: two encoder replicas (failover tests kill one last)."""
    config = StackConfig(model=str(model_dir), device="cpu", encoder_replicas=2,
                         log_dir=str(tmp_path_factory.mktemp("stack-logs")))
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> InProcessCaptioner:
    """The monolithic pipeline on the same weights: what every caption must equal."""
    return InProcessCaptioner.from_pretrained(model_dir, device="cpu")
