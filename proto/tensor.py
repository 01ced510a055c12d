"""Tensors on the wire: ``{"dtype": name, "shape": [..], "data": <raw bytes>}``.

The data is the tensor's little-endian, C-order bytes, so any msgpack library in any
language can read it. bfloat16 is first class and round-trips bit-exactly (the bytes
are never interpreted, only reinterpreted). Decoding validates the dtype, rank, dims
and ``prod(shape) * itemsize == len(data)`` *before* touching the data, then returns a
tensor that is a view of the received buffer: the only copy on the receive path is
the one msgpack makes when it hands out the ``bin`` object.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from proto.errors import BadTensor, LimitExceeded, MissingField, WrongType
from proto.limits import DEFAULT_LIMITS, WireLimits

__all__ = [
    "WIRE_DTYPES",
    "DecodeBudget",
    "dtype_from_name",
    "dtype_name",
    "tensor_from_wire",
    "tensor_to_wire",
    "to_device",
]

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in WIRE_DTYPES.items()}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.bfloat16`` → ``"bfloat16"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel on the wire; allowed: {sorted(WIRE_DTYPES)}") from None


def dtype_from_name(name: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype for a wire name, or ``BadTensor`` naming the field."""
    try:
        return WIRE_DTYPES[name]
    except (KeyError, TypeError):
        raise BadTensor(field, f"dtype not allowed (allowed: {', '.join(sorted(WIRE_DTYPES))})", name) from None


@dataclass
class DecodeBudget:
    """Running totals for one message, so many small tensors cannot add up to a big one."""

    limits: WireLimits = DEFAULT_LIMITS
    elements: int = 0
    tensors: int = 0

    def charge(self, field: str, elements: int) -> None:
        self.tensors += 1
        if self.tensors > self.limits.max_tensors:
            raise LimitExceeded(field, "tensor count", self.tensors, self.limits.max_tensors)
        self.elements += elements
        if self.elements > self.limits.max_message_elements:
            raise LimitExceeded(field, "elements in message", self.elements, self.limits.max_message_elements)


def _swap_to_little_endian(flat: torch.Tensor) -> torch.Tensor:
    # Only reached on big-endian hosts: reverse the bytes of each element.
    itemsize = flat.element_size()
    if itemsize == 1:
        return flat.view(torch.uint8)
    as_bytes = flat.view(torch.uint8).reshape(-1, itemsize)
    return as_bytes.flip(1).reshape(-1)


def tensor_to_wire(tensor: torch.Tensor) -> dict[str, Any]:
    """Encode a tensor as a wire map. Moves to CPU and makes it contiguous if needed."""
    name = dtype_name(tensor.dtype)
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    flat = tensor.contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if _LITTLE_ENDIAN_HOST else _swap_to_little_endian(flat)
    # memoryview of the tensor's own storage: msgpack copies it once into the message.
    return {"dtype": name, "shape": list(tensor.shape), "data": memoryview(raw.numpy())}


def to_device(tensor: torch.Tensor, device: torch.device | str,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (then cast to ``dtype``), the host→GPU copy asynchronous.

    A host→GPU copy from pageable memory goes through a driver staging buffer and may
    block; from page-locked memory it is an asynchronous DMA. So a CPU tensor bound for
    a GPU is first copied into pinned memory on the host (the one host copy the
    pageable path would make anyway), sent in its own dtype, then cast on the GPU:
    ``.to(device, dtype)`` in one call would cast on the host into fresh pageable memory
    and send twice the bytes of a bf16 source. A tensor that is already pinned is sent
    as it is: the caller must not modify it until the GPU's stream has read it.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)


def _check_shape(field: str, shape: Any, limits: WireLimits) -> list[int]:
    if not isinstance(shape, list):
        raise WrongType(f"{field}.shape", "a list of non-negative ints", shape)
    if len(shape) > limits.max_tensor_rank:
        raise BadTensor(f"{field}.shape", f"rank {len(shape)} exceeds the maximum of {limits.max_tensor_rank}", shape)
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise WrongType(f"{field}.shape", "a list of non-negative ints", dim)
        if dim < 0:
            raise BadTensor(f"{field}.shape", "negative dimension", shape)
        if dim > limits.max_tensor_elements:
            # Checked per dimension too: a zero-size tensor may still declare dims whose
            # strides overflow when allocated.
            raise LimitExceeded(f"{field}.shape", "dimension", dim, limits.max_tensor_elements)
    return shape


def tensor_from_wire(obj: Any, field: str, budget: DecodeBudget | None = None) -> torch.Tensor:
    """Decode and validate a wire map; raises a ``ProtocolError`` naming ``field``.

    The result shares memory with ``obj["data"]`` (read-only bytes): consumers that
    need to write must ``clone()`` first.
    """
    budget = budget if budget is not None else DecodeBudget()
    limits = budget.limits
    if not isinstance(obj, dict):
        raise WrongType(field, "a tensor map {dtype, shape, data}", obj)
    for key in ("dtype", "shape", "data"):
        if key not in obj:
            raise MissingField(f"{field}.{key}")
    extra = set(obj) - {"dtype", "shape", "data"}
    if extra:
        raise BadTensor(field, f"unexpected keys {sorted(map(str, extra))}")
    dtype = dtype_from_name(obj["dtype"], f"{field}.dtype")
    shape = _check_shape(field, obj["shape"], limits)
    data = obj["data"]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WrongType(f"{field}.data", "bin (raw bytes)", data)
    # Python ints: no overflow however large the declared dims are.
    elements = math.prod(shape)
    if elements > limits.max_tensor_elements:
        raise LimitExceeded(f"{field}.shape", "element count", elements, limits.max_tensor_elements)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if elements * itemsize != len(data):
        raise BadTensor(
            f"{field}.data",
            f"length {len(data)} does not match shape {shape} × {itemsize} bytes ({elements * itemsize})",
        )
    budget.charge(field, elements)
    if elements == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # bytes are immutable; torch warns that the view is not writable. We never write.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8 if not _LITTLE_ENDIAN_HOST else dtype)
    if not _LITTLE_ENDIAN_HOST:
        flat = _swap_to_little_endian(flat.view(dtype)).view(dtype)
    return flat.view(shape)
