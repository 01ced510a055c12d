"""Gateway building blocks: image checks, settings, SSE parsing, auth, the KServe transport,
the caption client and the CLI wiring."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import struct

import httpx
import numpy as np
import pytest
import torch
from gateway_fakes import IM_START, FakeLM, chat_body, harness, png, png_bomb

import proto
import services.gateway
from services import caption_client
from services.cli import COMMANDS
from services.gateway.auth import ApiKeyAuth
from services.gateway.errors import (
    AuthenticationFailed,
    InvalidImage,
    LimitExceeded,
    PayloadTooLarge,
)
from services.gateway.features import EncodedImage, features_name
from services.gateway.images import decode_base64_image, inspect_image, parse_data_url
from services.gateway.lm_client import affinity_key
from services.gateway.settings import GatewaySettings, add_gateway_arguments, settings_from_args
from services.gateway.sse import iter_events
from services.gateway.timing import StageTimer, remote_stages_ms


def run(coro):
    return asyncio.run(coro)


# ---- images -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_accepted_formats_are_read_from_the_header(fmt):
    data = png(30, 20, fmt=fmt)
    image = inspect_image(data, param="p", max_pixels=10_000, max_bytes=1 << 20)
    assert (image.format, image.width, image.height) == (fmt, 30, 20)
    assert image.sha256 == hashlib.sha256(data).hexdigest()


def test_refusals_happen_before_decoding():
    with pytest.raises(LimitExceeded, match="10000000000 pixels"):
        inspect_image(png_bomb(), param="p", max_pixels=10_000, max_bytes=1 << 20)
    with pytest.raises(InvalidImage, match="not a readable"):
        inspect_image(png(fmt="BMP"), param="p", max_pixels=10_000, max_bytes=1 << 20)
    with pytest.raises(InvalidImage, match="not a readable"):
        inspect_image(png()[:20], param="p", max_pixels=10_000, max_bytes=1 << 20)  # truncated header
    with pytest.raises(PayloadTooLarge):
        inspect_image(png(), param="p", max_pixels=10_000, max_bytes=10)


def test_base64_and_data_urls():
    data = png()
    wrapped = "\n".join(base64.encodebytes(data).decode().splitlines())  # MIME line breaks
    assert decode_base64_image(wrapped, param="p", max_bytes=1 << 20) == data
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()  # the label is only a hint
    assert parse_data_url(url, param="p", max_bytes=1 << 20) == data
    with pytest.raises(PayloadTooLarge) as caught:
        decode_base64_image("A" * 10_000, param="images[2]", max_bytes=100)  # refused before decoding
    assert caught.value.param == "images[2]"
    with pytest.raises(InvalidImage, match="base64"):
        parse_data_url("data:image/png," + data.hex(), param="p", max_bytes=1 << 20)
    with pytest.raises(InvalidImage, match="non-ASCII"):
        decode_base64_image("ÿÿÿÿ", param="p", max_bytes=100)
    with pytest.raises(InvalidImage, match="empty"):
        decode_base64_image("", param="p", max_bytes=100)


# ---- settings, CLI, caption client ---------------------------------------------------

def test_settings_from_flags_then_env_then_defaults():
    parser = argparse.ArgumentParser()
    env = {"STEP37_ENCODER_URL": "http://e1,http://e2", "STEP37_LM_URL": "http://l1/", "STEP37_MAX_IMAGES": "3",
           "STEP37_API_KEY": "sk-env"}
    add_gateway_arguments(parser, environ=env)
    assert "sk-env" not in parser.format_help()  # secrets stay out of --help
    settings = settings_from_args(parser.parse_args([]))
    assert settings.encoder_urls == ("http://e1", "http://e2") and settings.lm_urls == ("http://l1",)
    assert settings.max_images == 3 and settings.api_key == "sk-env" and settings.host == "127.0.0.1"
    settings = settings_from_args(parser.parse_args(["--encoder-url", "http://x", "--encoder-url", "http://y,http://z",
                                                     "--encoder-protocol", "kserve", "--allowed-url-hosts",
                                                     "Images.Example.com"]))
    assert settings.encoder_urls == ("http://x", "http://y", "http://z")  # flags replace the env value
    assert settings.cache_dtype == "float16" and settings.allowed_url_hosts == ("images.example.com",)
    with pytest.raises(ValueError, match="max_images"):
        GatewaySettings(max_images=0)


def test_cli_table_registers_gateway_and_caption():
    assert COMMANDS["gateway"][0] == "services.gateway.cli"
    assert COMMANDS["caption"][0] == "services.caption_client"
    assert services.gateway.__all__ == ["GatewaySettings", "GatewayState", "Transports", "create_app"]


def test_caption_client_prints_captions(tmp_path, capsys, monkeypatch):
    h = harness()
    paths = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png(colour=(i * 90, 0, 0)))
        paths.append(str(path))

    def post(url, **kwargs):  # the client's one HTTP call, served by the in-process app
        async def call():
            transport = httpx.ASGITransport(h.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                return await client.post(url.replace("http://gateway", ""), files=kwargs["files"],
                                         data=kwargs["data"], headers=kwargs["headers"])
        return run(call())

    monkeypatch.setattr(caption_client.httpx, "post", post)
    parser = argparse.ArgumentParser()
    caption_client.add_arguments(parser)
    assert caption_client.run(parser.parse_args([*paths, "--url", "http://gateway", "--max-tokens", "8"])) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths and "timings:" in out.err
    assert caption_client.run(parser.parse_args([str(tmp_path / "missing.png")])) == 1


# ---- SSE, auth ----------------------------------------------------------------------

def test_sse_parsing_follows_the_spec():
    async def lines():
        for line in [": keep-alive", "", "event: token", "data: {\"a\":", "data: 1}", "", "id: 3", "data:x", ""]:
            yield line
        yield "data: tail-without-blank-line"

    async def collect():
        return [event async for event in iter_events(lines())]

    assert run(collect()) == ['{"a":\n1}', "x", "tail-without-blank-line"]


def test_api_key_comparison():
    ApiKeyAuth(None).check(None)  # disabled: anything goes
    auth = ApiKeyAuth("sk-1")
    auth.check("Bearer sk-1")
    auth.check("bearer   sk-1 ")
    for header in (None, "", "Bearer", "Bearer sk-2", "Token sk-1", "Bearer sk-10"):
        with pytest.raises(AuthenticationFailed):
            auth.check(header)


def test_api_keys_are_compared_in_constant_time(monkeypatch):
    """Every presented key goes through hmac.compare_digest, never ``==``."""
    import services.gateway.auth as auth_module

    compared: list[tuple[bytes, bytes]] = []

    def spy(presented: bytes, expected: bytes) -> bool:
        compared.append((presented, expected))
        return presented == expected

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    auth = ApiKeyAuth("sk-1")
    auth.check("Bearer sk-1")
    with pytest.raises(AuthenticationFailed):
        auth.check("Bearer sk-2")
    assert compared == [(b"sk-1", b"sk-1"), (b"sk-2", b"sk-1")]


# ---- KServe v2 transport ------------------------------------------------------------

class FakeTriton:
    """A KServe v2 ``infer`` endpoint with the binary tensor extension, written from the spec."""

    def __init__(self, tokens: int = 3, dim: int = 8, max_batch_size: int = 8) -> None:
        self.tokens, self.dim, self.max_batch_size = tokens, dim, max_batch_size
        self.requests: list[dict] = []
        self.config_reads = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/models/step37-tiny/ready":
            return httpx.Response(200)
        if request.url.path == "/v2/models/step37-tiny/config":
            self.config_reads += 1
            return httpx.Response(200, json={"name": "step37-tiny", "max_batch_size": self.max_batch_size,
                                             "parameters": {"insert_start_token": {"string_value": str(IM_START)}}})
        assert request.url.path == "/v2/models/step37-tiny/infer", request.url.path
        header_length = int(request.headers["inference-header-content-length"])
        header = json.loads(request.content[:header_length])
        self.requests.append(header)
        (image_input,) = header["inputs"]
        assert (image_input["name"], image_input["datatype"]) == ("IMAGE", "BYTES")
        assert all(out["parameters"]["binary_data"] for out in header["outputs"])
        binary, images, offset = request.content[header_length:], [], 0
        while offset < len(binary):
            (size,) = struct.unpack_from("<I", binary, offset)
            images.append(binary[offset + 4 : offset + 4 + size])
            offset += 4 + size
        assert len(images) == image_input["shape"][0]
        if len(images) > self.max_batch_size:  # as Triton does
            return httpx.Response(400, json={"error": f"batch size {len(images)} exceeds {self.max_batch_size}"})
        features = np.stack([np.full((self.tokens, self.dim), len(image), np.float16) for image in images])
        cu = np.arange(0, (len(images) + 1) * 9, 9, dtype=np.int32)
        outputs = [{"name": "IMAGE_FEATURES", "datatype": "FP16", "shape": list(features.shape),
                    "parameters": {"binary_data_size": features.nbytes}},
                   {"name": "ROPE_CU_SEQLENS", "datatype": "INT32", "shape": list(cu.shape),
                    "parameters": {"binary_data_size": cu.nbytes}}]
        head = json.dumps({"model_name": "step37-tiny", "outputs": outputs}).encode()
        return httpx.Response(200, content=head + features.tobytes() + cu.tobytes(),
                              headers={"inference-header-content-length": str(len(head)),
                                       "content-type": "application/octet-stream"})


def test_kserve_encoder_transport_end_to_end():
    async def scenario():
        triton = FakeTriton()
        lm = FakeLM()
        transports = services.gateway.Transports(encoder=httpx.MockTransport(triton.handler),
                                                 lm=httpx.MockTransport(lm.handler))
        settings = GatewaySettings(encoder_urls=("http://triton",), lm_urls=("http://lm-a",),
                                   encoder_protocol="kserve")  # the insert token comes from the model config
        app = services.gateway.create_app(settings, transports)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            first, second = png(colour=(1, 2, 3)), png(40, 40)
            response = await client.post("/v1/chat/completions", json=chat_body(first, second))
            assert response.status_code == 200, response.text
            assert (await client.post("/v1/chat/completions", json=chat_body(png(5, 5)))).status_code == 200
            assert (await client.get("/ready")).status_code == 200
        assert triton.config_reads == 1
        (item,) = lm.requests[0].images
        assert item.insert_start_token == IM_START and str(item.image_features.dtype) == "torch.float16"
        assert list(item.image_features.shape) == [2, 3, 8]
        assert item.image_features[:, 0, 0].tolist() == [len(first), len(second)]  # order kept
        assert item.rope_cu_seqlens.tolist() == [0, 9, 18] and item.rope_max_seq_len == 9
        assert len(triton.requests) == 2

    run(scenario())


def test_kserve_requests_are_split_by_the_model_max_batch_size():
    async def scenario():
        triton = FakeTriton(max_batch_size=2)
        lm = FakeLM()
        transports = services.gateway.Transports(encoder=httpx.MockTransport(triton.handler),
                                                 lm=httpx.MockTransport(lm.handler))
        settings = GatewaySettings(encoder_urls=("http://triton",), lm_urls=("http://lm-a",),
                                   encoder_protocol="kserve")
        app = services.gateway.create_app(settings, transports)
        images = [png(8 + i, 8 + i) for i in range(5)]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            response = await client.post("/v1/chat/completions", json=chat_body(*images))
            assert response.status_code == 200, response.text
        assert [r["inputs"][0]["shape"][0] for r in triton.requests] == [2, 2, 1]
        (item,) = lm.requests[0].images
        assert item.image_features[:, 0, 0].tolist() == [len(image) for image in images]  # order kept
        assert item.rope_cu_seqlens.tolist() == [0, 9, 18, 27, 36, 45] and item.rope_max_seq_len == 9

    run(scenario())


def test_kserve_errors_map_like_native_ones():
    async def scenario():
        def handler(request: httpx.Request) -> httpx.Response:
            if "bad" in request.url.host:
                return httpx.Response(400, json={"error": "unable to decode IMAGE[0]"})
            return httpx.Response(500, json={"error": "CUDA error"})

        transports = services.gateway.Transports(encoder=httpx.MockTransport(handler),
                                                 lm=httpx.MockTransport(FakeLM().handler))
        settings = GatewaySettings(encoder_urls=("http://bad",), lm_urls=("http://lm-a",), encoder_protocol="kserve",
                                   kserve_insert_start_token=IM_START)
        app = services.gateway.create_app(settings, transports)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            error = (await client.post("/v1/chat/completions", json=chat_body(png()))).json()["error"]
            assert error["code"] == "invalid_request" and "unable to decode IMAGE[0]" in error["message"]

    run(scenario())


# ---- timings ------------------------------------------------------------------------

def test_stage_timer_reads_downstream_timings_and_derives_transfer():
    timer = StageTimer()
    worker = {"queue_ms": 1.0, "prefill_ms": 2.0, "decode_ms": 5.0, "total_ms": 8.0, "tokens_per_s": 900.0}
    timer.add_call("lm", 10.0, worker)
    timer.add_call("encoder", 4.0, {"queue": 1.0, "forward": 2.0})  # unitless keys are milliseconds
    timer.add_call("encoder", 3.0, {})  # nothing reported: no transfer can be derived
    assert remote_stages_ms(worker) == {"queue": 1.0, "prefill": 2.0, "decode": 5.0, "total": 8.0}
    timings = timer.as_dict()
    assert timings["transfer"] == 3.0  # (10 - 8) + (4 - 3)
    assert timings["lm.prefill"] == 2.0 and "lm.tokens_per_s" not in timings
    with timer.stage("encode"):
        pass
    names = [item.split(";")[0] for item in timer.server_timing().split(", ")]
    assert names[0] == "encode" and "transfer" in names and names[-1] == "total"


def test_a_features_name_stands_for_exactly_one_set_of_features_and_one_salt():
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    image = EncodedImage(features, 4, 16)
    assert features_name([image]) == features_name([EncodedImage(features.clone(), 4, 16)])
    # Another encoder's features for the same image bytes (other weights, a rollout) are another name.
    assert features_name([EncodedImage(features + 1, 4, 16)]) != features_name([image])
    assert features_name([EncodedImage(features.float(), 4, 16)]) != features_name([image])
    assert features_name([EncodedImage(features, 7, 16)]) != features_name([image])
    assert len({features_name([image]), features_name([image], "tenant-a"), features_name([image], "tenant-b")}) == 3
    other = EncodedImage(features.flip(0), 4, 16)
    assert features_name([image, other]) != features_name([other, image])


def test_affinity_key_names_the_first_image_and_the_text_before_it():
    features = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def key(prompt: str, image_features: torch.Tensor | None, cache_salt: str | None = None) -> bytes | None:
        images = [proto.ImageForInsert(4, image_features=image_features)] if image_features is not None else []
        return affinity_key(proto.GenerateRequest(prompt=prompt, images=images, cache_salt=cache_salt))

    base = key("<image> describe", features)
    assert base is not None and key("<image> describe", features.clone()) == base
    assert key("<image> count the shapes", features) == base  # text after the image: same prefix
    assert key("look: <image> describe", features) != base
    assert key("<image> describe", features[[1, 0]]) != base  # another first image
    assert key("<image> describe", features.float()) != base
    salted = key("<image> describe", features, "tenant-a")  # hits only its own salt's prefixes
    assert salted != base and key("<image> describe", features, "tenant-a") == salted
    assert key("<image> describe", features, "tenant-b") != salted
    assert key("describe", None) is None
