"""Shared fixtures. Tests are tiered by folder: unit (in-process), integration (real
processes on free ports), e2e (the whole system)."""

import signal

import torch

# Two cores on the development and CI machines: keep torch from oversubscribing them
# when pytest and a server process run side by side.
torch.set_num_threads(2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# `kill` (SIGTERM) on a test run behaves like Ctrl-C: pytest stops and runs the fixtures'
# teardown, which stops the service processes the integration and e2e tests started
# (by default SIGTERM ends pytest at once and leaves them running).
signal.signal(signal.SIGTERM, _interrupt)
