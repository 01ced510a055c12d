"""KServe v2 / Triton HTTP wire format for the vision tower, without any HTTP framework.

An infer request body is a JSON header optionally followed by raw tensor bytes (the
binary tensor data extension): ``Inference-Header-Content-Length`` says where the JSON
ends, and each input with ``parameters.binary_data_size`` takes that many bytes, in
input order. ``BYTES`` elements are laid out as a 4-byte little-endian length then the
bytes. Responses mirror it: outputs asked for in binary (``binary_data`` per output,
or ``binary_data_output`` for all) carry ``binary_data_size`` and their bytes follow
the JSON. Everything here is checked before it is used, and every problem is an
`InvalidRequest` whose message names the input and says what was expected.

The model speaks ``IMAGE`` (BYTES [N] or [N, 1]: encoded files) or ``PIXELS`` (FP32
[N, 3, H, W]: CLIP-normalised) in, and ``IMAGE_FEATURES`` (FP16 unless the request
parameter ``output_dtype`` says FP32; tritonclient decodes BF16 wrongly, so it is
never sent) and ``ROPE_CU_SEQLENS`` (INT32 [N + 1]) out.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from encoder_server.errors import InvalidRequest
from proto import EncodeRequest, EncodeResponse

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "InferRequest",
    "InferTensor",
    "infer_response",
    "parse_infer_request",
]

INPUTS = {"IMAGE": "BYTES", "PIXELS": "FP32"}
OUTPUTS = ("IMAGE_FEATURES", "ROPE_CU_SEQLENS")
OUTPUT_DTYPES = {"FP16": "float16", "FP32": "float32"}
_LENGTH = struct.Struct("<I")  # BYTES element prefix


@dataclass
class InferTensor:
    """One decoded input: exactly one of ``images`` / ``pixels`` is set."""

    name: str
    shape: list[int]
    images: list[bytes] | None = None
    pixels: torch.Tensor | None = None  # [N, 3, H, W] float32 (a view of the body)


@dataclass
class InferRequest:
    """What the server needs from a KServe v2 infer request."""

    input: InferTensor
    id: str | None = None
    outputs: dict[str, bool] = field(default_factory=dict)  # name -> binary
    output_datatype: str = "FP16"
    timeout_s: float | None = None

    def to_encode_request(self) -> EncodeRequest:
        message = EncodeRequest(images=self.input.images or [], pixels=self.input.pixels,
                                output_dtype=OUTPUT_DTYPES[self.output_datatype])
        if self.id:
            message.request_id = self.id[:128]
        return message


def parse_infer_request(body: bytes, header_length: str | None, *, model: str,
                        max_batch_size: int) -> InferRequest:
    """Split and check the body; the tensors returned are views into ``body``."""
    header, binary = _split(body, header_length)
    try:
        document = json.loads(bytes(header))  # the header is small: copying it is free
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the inference header is not valid JSON: {exc}", field="header") from exc
    if not isinstance(document, dict):
        raise InvalidRequest("the inference header must be a JSON object", field="header")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list", field="inputs")
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or spec["name"] not in INPUTS:
            name = spec.get("name") if isinstance(spec, dict) else spec
            raise InvalidRequest(f"unexpected inference input {name!r} for model '{model}'; "
                                 f"expected one of {', '.join(INPUTS)}", field="inputs")
    if len(inputs) != 1:
        raise InvalidRequest(f"give exactly one of the inputs {', '.join(INPUTS)}, got "
                             f"{[spec['name'] for spec in inputs]}", field="inputs")
    tensor, used = _read_input(inputs[0], binary, model, max_batch_size)
    if used != len(binary):
        raise InvalidRequest(f"{len(binary) - used} bytes of binary data follow the inputs' "
                             "binary_data_size; the body and the header disagree", field="body")
    parameters = _object(document.get("parameters", {}), "parameters")
    request_id = document.get("id")
    return InferRequest(
        input=tensor,
        id=request_id if isinstance(request_id, str) else None,
        outputs=_requested_outputs(document.get("outputs"), parameters, model),
        output_datatype=_output_datatype(parameters),
        timeout_s=_timeout_s(parameters),
    )


def _split(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view):]
    text = header_length.strip()
    # ASCII only: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not (text.isascii() and text.isdigit()):
        raise InvalidRequest("Inference-Header-Content-Length must be a non-negative integer",
                             field="Inference-Header-Content-Length", value=header_length)
    length = int(text)
    if length > len(body):
        raise InvalidRequest(f"Inference-Header-Content-Length {length} is beyond the end of the "
                             f"{len(body)}-byte body", field="Inference-Header-Content-Length",
                             value=length)
    return view[:length], view[length:]


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest("must be a JSON object", field=name)
    return value


def _shape(spec: dict[str, Any], name: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise InvalidRequest(f"inference input '{name}' needs a shape of non-negative integers, "
                             f"got {shape!r}", field=f"{name}.shape")
    return shape


def _read_input(spec: dict[str, Any], binary: memoryview, model: str,
                max_batch_size: int) -> tuple[InferTensor, int]:
    """Decode one input; returns it and how many binary bytes it consumed."""
    name = spec["name"]
    expected = INPUTS[name]
    if spec.get("datatype") != expected:
        raise InvalidRequest(f"inference input '{name}' data-type is {spec.get('datatype')!r}, "
                             f"but model '{model}' expects '{expected}'", field=f"{name}.datatype")
    shape = _shape(spec, name)
    if name == "IMAGE":
        shape_ok, wanted = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1), "[N] or [N, 1]"
    else:
        shape_ok, wanted = len(shape) == 4 and shape[1] == 3, "[N, 3, H, W]"
    if not shape_ok:
        raise InvalidRequest(f"inference input '{name}' has shape {shape}; model '{model}' "
                             f"expects {wanted}", field=f"{name}.shape")
    if not 1 <= shape[0] <= max_batch_size:
        raise InvalidRequest(f"inference request batch-size must be between 1 and "
                             f"{max_batch_size} for '{model}', got {shape[0]}", field=f"{name}.shape")
    parameters = _object(spec.get("parameters", {}), f"{name}.parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise InvalidRequest(f"inference input '{name}' has neither 'data' nor "
                                 "parameters.binary_data_size", field=f"{name}.data")
        return _from_json(name, shape, spec["data"]), 0
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequest("binary_data_size must be a non-negative integer",
                             field=f"{name}.parameters.binary_data_size", value=size)
    if size > len(binary):
        raise InvalidRequest(f"inference input '{name}' declares binary_data_size {size} but only "
                             f"{len(binary)} bytes follow the header",
                             field=f"{name}.parameters.binary_data_size", value=size)
    data = binary[:size]
    if name == "IMAGE":
        return InferTensor(name, shape, images=_split_bytes(data, math.prod(shape))), size
    expected_size = math.prod(shape) * 4
    if size != expected_size:
        raise InvalidRequest(f"inference input 'PIXELS' of shape {shape} needs {expected_size} "
                             f"bytes of FP32, binary_data_size is {size}",
                             field="PIXELS.parameters.binary_data_size", value=size)
    with warnings.catch_warnings():  # a read-only view of the body: the batcher copies it
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.frombuffer(data, dtype=torch.float32) if size else torch.empty(0)
    return InferTensor(name, shape, pixels=pixels.view(shape)), size


def _split_bytes(data: memoryview, count: int) -> list[bytes]:
    """Triton's BYTES layout: per element a uint32 LE length, then that many bytes."""
    items: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(data):
            raise InvalidRequest(f"BYTES element {index} of 'IMAGE' has no 4-byte length prefix "
                                 "(the binary data ends early)", field="IMAGE.parameters.binary_data_size")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidRequest(f"BYTES element {index} of 'IMAGE' declares {length} bytes, "
                                 f"{len(data) - offset} remain", field="IMAGE.parameters.binary_data_size")
        items.append(bytes(data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise InvalidRequest(f"'IMAGE' has {len(data) - offset} bytes after its {count} elements",
                             field="IMAGE.parameters.binary_data_size")
    return items


def _from_json(name: str, shape: list[int], data: Any) -> InferTensor:
    """JSON ``data``: flat or nested row-major lists (strings for BYTES, numbers for FP32)."""
    count = math.prod(shape)
    if name == "IMAGE":
        strings = _flatten(data) if isinstance(data, list) else None
        if strings is None or len(strings) != count or not all(isinstance(s, str) for s in strings):
            raise InvalidRequest(f"'IMAGE' data must hold {count} strings", field="IMAGE.data")
        return InferTensor(name, shape, images=[item.encode() for item in strings])
    try:
        values = np.asarray(data, dtype=np.float32).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:  # Overflow: a JSON int past float range
        raise InvalidRequest(f"'PIXELS' data must be numbers: {exc}", field="PIXELS.data") from exc
    if values.size != count:
        raise InvalidRequest(f"'PIXELS' data holds {values.size} values, shape {shape} needs {count}",
                             field="PIXELS.data")
    return InferTensor(name, shape, pixels=torch.from_numpy(values).view(shape))


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: the nesting depth is the client's choice
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _requested_outputs(outputs: Any, parameters: dict[str, Any], model: str) -> dict[str, bool]:
    default_binary = bool(parameters.get("binary_data_output", False))
    if outputs is None:
        return dict.fromkeys(OUTPUTS, default_binary)
    if not isinstance(outputs, list):
        raise InvalidRequest("'outputs' must be a list", field="outputs")
    requested: dict[str, bool] = {}
    for spec in outputs:
        name = spec.get("name") if isinstance(spec, dict) else spec
        if name not in OUTPUTS:
            raise InvalidRequest(f"unexpected inference output {name!r} for model '{model}'; "
                                 f"expected one of {', '.join(OUTPUTS)}", field="outputs")
        options = _object(spec.get("parameters", {}) if isinstance(spec, dict) else {}, f"outputs.{name}.parameters")
        requested[name] = bool(options.get("binary_data", default_binary))
    return requested


def _output_datatype(parameters: dict[str, Any]) -> str:
    value = parameters.get("output_dtype", "FP16")
    if not isinstance(value, str) or value not in OUTPUT_DTYPES:
        raise InvalidRequest("output_dtype must be 'FP16' or 'FP32' (tritonclient decodes BF16 "
                             "wrongly, so this route does not send it)",
                             field="parameters.output_dtype", value=value)
    return value


def _timeout_s(parameters: dict[str, Any]) -> float | None:
    timeout = parameters.get("timeout")  # Triton: microseconds
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise InvalidRequest("timeout must be a positive integer of microseconds",
                             field="parameters.timeout", value=timeout)
    return timeout / 1e6


# ---- response -----------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float16: "FP16", torch.float32: "FP32", torch.int32: "INT32"}


def infer_response(request: InferRequest, response: EncodeResponse, *, model: str,
                   version: str) -> tuple[list[bytes | memoryview], int | None]:
    """The response body as chunks, and the JSON header's length when binary data follows."""
    image = response.image
    tensors = {"IMAGE_FEATURES": image.image_features, "ROPE_CU_SEQLENS": image.rope_cu_seqlens}
    outputs: list[dict[str, Any]] = []
    payloads: list[memoryview] = []
    for name, binary in request.outputs.items():
        tensor = tensors[name]
        assert isinstance(tensor, torch.Tensor)
        entry: dict[str, Any] = {"name": name, "datatype": _TRITON_DTYPES[tensor.dtype],
                                 "shape": list(tensor.shape)}
        if binary:
            data = memoryview(tensor.contiguous().numpy()).cast("B")  # little-endian hosts only
            entry["parameters"] = {"binary_data_size": data.nbytes}
            payloads.append(data)
        else:
            entry["data"] = tensor.reshape(-1).tolist()
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs,
                                "parameters": {f"{stage}": value for stage, value in response.timings.items()}}
    if request.id is not None:
        document["id"] = request.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not payloads:
        return [header], None
    return [header, *payloads], len(header)
