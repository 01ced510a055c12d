"""Shared fixtures. Tests are tiered by folder: unit (in-process), integration (real
processes on free ports), e2e (the whole system)."""

import torch

# Two cores on the development and CI machines: keep torch from oversubscribing them
# when pytest and a server process run side by side.
torch.set_num_threads(2)
