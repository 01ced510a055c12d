"""KServe v2 encoder transport, so the encoder tier can be a real Triton Inference Server.

The request and response bodies — JSON header plus the binary tensor data extension
— are built and parsed by ``tritonclient.http.aio`` itself, so whatever Triton and
tritonclient agree on, this agrees on. The bytes travel over the gateway's shared
``httpx`` client rather than tritonclient's own aiohttp session: one connection pool,
one set of timeouts, one failover loop and one test seam (``httpx.MockTransport``)
for both protocols.

Model contract (the encoder service's KServe route and the Triton model repository):
input ``IMAGE`` BYTES ``[N, 1]`` (encoded files); outputs ``IMAGE_FEATURES`` FP16
``[N, L, C]`` (tritonclient misreads BF16) and ``ROPE_CU_SEQLENS`` INT32 ``[N+1]``.
The insert token is not part of a KServe answer: it comes from settings, or once
from the model's configuration (``parameters.insert_start_token``, published by the
encoder service and by the Triton model repository).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import torch

from proto import ImageForInsert
from services.gateway.encoder_client import SERVICE, EncodeResult
from services.gateway.errors import UpstreamError
from services.gateway.upstream import error_from_exception, error_from_status, read_bounded

__all__ = ["KServeEncoderTransport"]

_HEADER_LENGTH = "inference-header-content-length"


class KServeEncoderTransport:
    """``POST /v2/models/{model}/infer`` with binary tensors."""

    def __init__(self, model: str, insert_start_token: int | None = None, *,
                 max_response_bytes: int = 512 << 20) -> None:
        # Imported here: tritonclient pulls in aiohttp and gevent, which a native-only
        # gateway should not pay for at start-up.
        from tritonclient.http import aio as triton_aio

        self._triton = triton_aio
        self.model = model
        self.insert_start_token = insert_start_token
        self._facts: tuple[int, int | None] | None = None
        self.max_response_bytes = max_response_bytes
        self.ready_path = f"/v2/models/{quote(model)}/ready"

    def _request_body(self, images: Sequence[bytes], request_id: str) -> tuple[bytes, int | None]:
        # [N, 1]: Triton refuses [N] for a model with max_batch_size > 0; the encoder takes both.
        image_input = self._triton.InferInput("IMAGE", [len(images), 1], "BYTES")
        image_input.set_data_from_numpy(np.array(list(images), dtype=np.object_).reshape(-1, 1), binary_data=True)
        outputs = [self._triton.InferRequestedOutput(name, binary_data=True)
                   for name in ("IMAGE_FEATURES", "ROPE_CU_SEQLENS")]
        return self._triton.InferenceServerClient.generate_request_body(
            [image_input], outputs=outputs, request_id=request_id)

    async def _model_facts(self, client: httpx.AsyncClient, base_url: str,
                           timeout: httpx.Timeout) -> tuple[int, int | None]:
        """(insert start token, max_batch_size) from the model config, read once: every
        endpoint serves the same model. A configured token makes the config optional."""
        if self._facts is not None:
            return self._facts
        config: dict[str, Any] | None = None
        try:
            response = await client.get(f"{base_url}/v2/models/{quote(self.model)}/config", timeout=timeout)
            if response.status_code == 200:
                config = response.json()
            elif self.insert_start_token is None:
                raise error_from_status(SERVICE, response.status_code, response.content[:65536], idempotent=True)
        except httpx.HTTPError as exc:
            if self.insert_start_token is None:
                raise error_from_exception(SERVICE, exc, idempotent=True) from exc
        except ValueError:
            config = None  # not JSON: treated like a missing config
        token = self.insert_start_token
        if token is None:
            try:
                token = int(config["parameters"]["insert_start_token"]["string_value"])  # type: ignore[index]
            except (ValueError, KeyError, TypeError) as exc:
                raise UpstreamError(f"the config of model {self.model!r} has no parameters.insert_start_token; "
                                    f"set --kserve-insert-start-token") from exc
        max_batch = config.get("max_batch_size") if isinstance(config, dict) else None
        self._facts = (token, max_batch if isinstance(max_batch, int) and max_batch > 0 else None)
        return self._facts

    def _parse(self, data: bytes, header_length: str | None, count: int, insert_start_token: int) -> EncodeResult:
        try:
            result = self._triton.InferenceServerClient.parse_response_body(
                data, header_length=int(header_length) if header_length else None)
            features = result.as_numpy("IMAGE_FEATURES")
            cu_seqlens = result.as_numpy("ROPE_CU_SEQLENS")
        except (self._triton.InferenceServerException, ValueError, KeyError) as exc:
            raise UpstreamError(f"the encoder sent an unreadable KServe response ({exc})", retryable=True,
                                endpoint_fault=True) from exc
        if features is None or features.ndim != 3 or features.shape[0] != count:
            shape = None if features is None else list(features.shape)
            raise UpstreamError(f"IMAGE_FEATURES: expected [{count}, L, C], got {shape}", endpoint_fault=True)
        if features.dtype not in (np.float16, np.float32):
            raise UpstreamError(f"IMAGE_FEATURES: expected FP16 or FP32, got {features.dtype}", endpoint_fault=True)
        rope: dict[str, Any] = {}
        if cu_seqlens is not None:
            cu = torch.from_numpy(np.array(cu_seqlens, dtype=np.int32).reshape(-1))  # [N+1], a copy
            rope = {"rope_cu_seqlens": cu, "rope_max_seq_len": int((cu[1:] - cu[:-1]).max()) if count else 0}
        # np.array copies: tritonclient's arrays are read-only views of the body.
        image = ImageForInsert(insert_start_token, image_features=torch.from_numpy(np.array(features)),
                               **rope)  # [N, L, C]
        return EncodeResult(image=image, model=self.model, timings={})

    async def encode(self, client: httpx.AsyncClient, base_url: str, images: Sequence[bytes], *,
                     request_id: str, timeout: httpx.Timeout) -> EncodeResult:
        insert_start_token, max_batch = await self._model_facts(client, base_url, timeout)
        if max_batch is None or len(images) <= max_batch:
            return await self._infer(client, base_url, images, insert_start_token, request_id, timeout)
        # Triton (and our KServe route) refuse a request larger than max_batch_size.
        parts = [await self._infer(client, base_url, images[i : i + max_batch], insert_start_token,
                                   request_id, timeout) for i in range(0, len(images), max_batch)]
        return _concatenate(parts, insert_start_token, self.model)

    async def _infer(self, client: httpx.AsyncClient, base_url: str, images: Sequence[bytes],
                     insert_start_token: int, request_id: str, timeout: httpx.Timeout) -> EncodeResult:
        body, json_size = self._request_body(images, request_id)
        headers = {"content-type": "application/octet-stream", "x-request-id": request_id}
        if json_size is not None:
            headers[_HEADER_LENGTH] = str(json_size)
        url = f"{base_url}/v2/models/{quote(self.model)}/infer"
        try:
            request = client.build_request("POST", url, content=body, headers=headers, timeout=timeout)
            response = await client.send(request, stream=True)
            try:
                if response.status_code != 200:
                    raise error_from_status(SERVICE, response.status_code,
                                            await read_bounded(response, 64 * 1024, service=SERVICE), idempotent=True)
                data = await read_bounded(response, self.max_response_bytes, service=SERVICE)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise error_from_exception(SERVICE, exc, idempotent=True) from exc
        # httpx has already undone any content-encoding, so none is passed on.
        return self._parse(data, response.headers.get(_HEADER_LENGTH), len(images), insert_start_token)


def _concatenate(parts: Sequence[EncodeResult], insert_start_token: int, model: str) -> EncodeResult:
    """One ImageForInsert from consecutive chunks, in order: features stacked,
    rope_cu_seqlens offsets carried over."""
    features = torch.cat([part.image.image_features for part in parts])  # [N, L, C]
    rope: dict[str, Any] = {}
    if all(part.image.rope_cu_seqlens is not None for part in parts):
        counts = torch.cat([part.image.rope_cu_seqlens.diff() for part in parts])  # [N]
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])  # [N+1]
        rope = {"rope_cu_seqlens": cu, "rope_max_seq_len": int(counts.max()) if counts.numel() else 0}
    return EncodeResult(image=ImageForInsert(insert_start_token, image_features=features, **rope), model=model,
                        timings={})
