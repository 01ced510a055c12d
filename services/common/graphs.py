"""CUDA graph plumbing shared by the encoder's tower and the LM worker's decode steps.

A graph replays fixed shapes at fixed addresses, so each user keeps one graph per
padded batch size and copies its inputs into that graph's own buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["capture", "padded_batch_sizes"]

T = TypeVar("T")


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = [1 << shift for shift in range(max_batch_size.bit_length()) if 1 << shift < max_batch_size]
    return [*sizes, max_batch_size]


def capture(step: Callable[[], T], device: torch.device, pool: tuple[int, int] | None = None
            ) -> tuple[torch.cuda.CUDAGraph, T]:
    """Record ``step`` (after two warm-up runs on a side stream: allocator, cuBLAS
    workspaces, lazily built tensors) as a graph; returns it and ``step``'s outputs,
    which each replay overwrites. ``pool``: another graph's memory, to share it."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = step()
    return graph, outputs
