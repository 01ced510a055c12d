"""KServe v2 / Triton metadata documents: server, model, model config, repository index.

Shapes follow Triton's conventions so ``tritonclient`` and ``perf_analyzer`` read them
unchanged: with ``max_batch_size > 0`` the model config's ``dims`` leave out the batch
dimension and the metadata's ``shape`` starts with ``-1`` for it. ``ROPE_CU_SEQLENS``
is the exception, being per request ([N + 1]) rather than per image; its config dims
say ``[-1]`` and a Triton python-backend port has to declare it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from encoder_server.kserve_protocol import INPUTS

__all__ = [
    "ModelFacts",
    "SERVER_EXTENSIONS",
    "model_config",
    "model_metadata",
    "repository_index",
    "server_metadata",
]

SERVER_NAME = "step37-serve"
SERVER_VERSION = "0.1.0"
# Only what this server implements; "model_repository" would promise load/unload.
SERVER_EXTENSIONS = ("binary_tensor_data", "model_configuration", "parameters",
                     "schedule_policy", "statistics")
_CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "FP16": "TYPE_FP16",
                 "INT32": "TYPE_INT32"}


@dataclass(frozen=True)
class ModelFacts:
    """What the documents describe, gathered from the service once."""

    name: str
    version: str
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    request_timeout_s: float
    feature_dim: int  # C of IMAGE_FEATURES
    image_size: int
    patch_size: int
    insert_start_token: int
    device: str  # "cpu", "cuda:0", ...


def _io(facts: ModelFacts) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) with dims *without* the batch dimension."""
    inputs = [
        {"name": "IMAGE", "datatype": INPUTS["IMAGE"], "dims": [1]},
        {"name": "PIXELS", "datatype": INPUTS["PIXELS"], "dims": [3, -1, -1]},
    ]
    outputs = [
        {"name": "IMAGE_FEATURES", "datatype": "FP16", "dims": [-1, facts.feature_dim]},
        {"name": "ROPE_CU_SEQLENS", "datatype": "INT32", "dims": [-1]},
    ]
    return inputs, outputs


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)}


def model_metadata(facts: ModelFacts) -> dict[str, Any]:
    inputs, outputs = _io(facts)

    def tensor(spec: dict[str, Any], batched: bool) -> dict[str, Any]:
        shape = [-1, *spec["dims"]] if batched else spec["dims"]
        return {"name": spec["name"], "datatype": spec["datatype"], "shape": shape}

    return {
        "name": facts.name,
        "versions": [facts.version],
        "platform": "pytorch",
        "inputs": [tensor(spec, True) for spec in inputs],
        "outputs": [tensor(spec, spec["name"] != "ROPE_CU_SEQLENS") for spec in outputs],
    }


def model_config(facts: ModelFacts) -> dict[str, Any]:
    """The model's configuration as Triton's ``GET .../config`` returns it (JSON form)."""
    inputs, outputs = _io(facts)
    kind = "KIND_CPU" if facts.device == "cpu" else "KIND_GPU"
    return {
        "name": facts.name,
        "platform": "pytorch",
        "backend": "",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": facts.max_batch_size,
        "input": [
            {"name": spec["name"], "data_type": _CONFIG_TYPES[spec["datatype"]],
             "format": "FORMAT_NONE", "dims": spec["dims"], "optional": True}
            for spec in inputs
        ],
        "output": [
            {"name": spec["name"], "data_type": _CONFIG_TYPES[spec["datatype"]], "dims": spec["dims"]}
            for spec in outputs
        ],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": int(facts.max_queue_delay_ms * 1000),
            "preserve_ordering": False,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": int(facts.request_timeout_s * 1e6),
                "allow_timeout_override": True,
                "max_queue_size": facts.max_queue_size,
            },
        },
        "instance_group": [{"name": f"{facts.name}_0", "kind": kind, "count": 1}],
        "parameters": {
            "image_size": {"string_value": str(facts.image_size)},
            "patch_size": {"string_value": str(facts.patch_size)},
            "insert_start_token": {"string_value": str(facts.insert_start_token)},
            "output_dtype": {"string_value": "FP16 (request parameter output_dtype: FP16|FP32)"},
        },
    }


def repository_index(facts: ModelFacts, ready: bool, reason: str = "") -> list[dict[str, Any]]:
    entry = {"name": facts.name, "version": facts.version, "state": "READY" if ready else "UNAVAILABLE"}
    if not ready:
        entry["reason"] = reason
    return [entry]
