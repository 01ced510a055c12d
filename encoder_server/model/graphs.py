"""The tower's forward at its trained resolution, replayed from CUDA graphs.

A small tower's forward is a few hundred kernels whose launches, not their arithmetic,
take its time on a GPU (the bundled model: 4.0 ms of a request at concurrency 1 on an
H200). A graph per padded batch size (1, 2, 4, … the batcher's largest) replays them
with one launch. Images are independent through the tower (attention and norms are
per image), so zero rows padding a batch change nothing in the real rows. Other
resolutions, other dtypes and larger batches run the model eagerly.
"""

from __future__ import annotations

import torch

from encoder_server.model.vision import Step37VisionModel
from services.common.graphs import capture, padded_batch_sizes

__all__ = ["TowerGraphs"]


class TowerGraphs:
    """Callable like the model on ``pixel_values [N, 3, H, W]`` (float32, on its device)."""

    def __init__(self, model: Step37VisionModel, max_batch_size: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        side = model.config.image_size
        self.input_shape = (3, side, side)
        self.sizes = padded_batch_sizes(max_batch_size)
        # Allocated outside inference mode: the replays write them from inside it.
        self._inputs = {size: torch.zeros(size, *self.input_shape, device=self.device) for size in self.sizes}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            pool = None
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
                step = lambda size=size: model(self._inputs[size])  # noqa: E731
                self._graphs[size], self._outputs[size] = capture(step, self.device, pool)
                pool = self._graphs[size].pool()

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        count = pixel_values.shape[0]
        if (tuple(pixel_values.shape[1:]) != self.input_shape or not 0 < count <= self.sizes[-1]
                or pixel_values.dtype != torch.float32 or pixel_values.device != self.device):
            return self.model(pixel_values)
        size = next(size for size in self.sizes if size >= count)
        inputs = self._inputs[size]
        inputs[:count].copy_(pixel_values)
        if count < size:
            inputs[count:].zero_()
        self._graphs[size].replay()
        return self._outputs[size][:count].clone()  # the next replay overwrites the graph's output
