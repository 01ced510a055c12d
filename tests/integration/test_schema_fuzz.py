"""Schema-driven HTTP fuzzing (schemathesis) of each service's published OpenAPI document,
against the real running encoder, LM worker and gateway.

For every operation a document describes, schemathesis generates requests that fit it
(paths, path and query parameters, bodies) and, where there is something to get
wrong, requests that break it; real path values (the served model, version ``1``) are
mixed in so the routes behind a model name are reached too. No answer may be a 5xx,
every 4xx is JSON, and each service must still serve a real request afterwards.

The worker routes that read raw bodies (``/v1/encode``, KServe ``infer``,
``/v1/generate``) publish no request body, so their documents fuzz paths and
parameters only; the gateway publishes the bodies of chat completions and captions
(JSON, and multipart for captions), so those are fuzzed as well. The msgpack and image
bodies are the bad-input matrices' job (``test_bad_input_*``).
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.core.result import Err

import proto
from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL, Stack, StackConfig

MAX_EXAMPLES = 15  # per operation: a CI-sized run, seconds per service
MODEL = BUNDLED_MODEL.name
PATH_VALUES = {"name": MODEL, "version": "1", "model_id": MODEL}  # what real clients put in the paths


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig(model=str(BUNDLED_MODEL), device="cpu", log_dir=str(tmp_path_factory.mktemp("stack-logs")),
                         encoder_args=["--max-queue-delay-ms", "1"],
                         gateway_args=["--max-tokens", "8", "--default-max-tokens", "4"])
    with Stack(config) as running:
        yield running


def operations(schema: BaseSchema) -> list[APIOperation]:
    """Every operation of the document; one it describes inconsistently fails the test."""
    found = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        found.append(result.ok())
    return found


def strategy(operation: APIOperation) -> st.SearchStrategy[Case]:
    """Fitting requests; breaking ones where the operation has inputs beyond its path
    (a path segment is any string, so none breaks it); fitting ones with real path values."""
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    if len(operation.query) or len(operation.headers) or len(operation.body):
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    known = {p.name: PATH_VALUES[p.name] for p in operation.path_parameters if p.name in PATH_VALUES}
    if known:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known))
    return st.one_of(strategies)


def fuzz(schema: BaseSchema, base_url: str) -> Counter[tuple[str, int]]:
    """Run every operation's strategy against ``base_url``; count answers by (operation, status)."""
    seen: Counter[tuple[str, int]] = Counter()
    with requests.Session() as session:
        for operation in operations(schema):

            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy(operation))
            def answers_without_a_server_error(case: Case) -> None:
                response = case.call(base_url=base_url, session=session, timeout=30)
                seen[(case.operation.label, response.status_code)] += 1
                described = f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:500]}"
                assert response.status_code < 500, described
                if response.status_code >= 400:  # headers: lower-case names, lists of values
                    assert response.headers.get("content-type", [""])[0].startswith("application/json"), described

            answers_without_a_server_error()
    return seen


def assert_fuzzed(seen: Counter[tuple[str, int]], schema: BaseSchema) -> None:
    """Every operation was called, and both answers and refusals came back (not all one)."""
    assert {label for label, _ in seen} == {operation.label for operation in operations(schema)}
    statuses = {status for _, status in seen}
    assert any(status < 300 for status in statuses) and any(400 <= status < 500 for status in statuses), seen


def scene_png() -> bytes:
    buffer = io.BytesIO()
    generate_scene(9_200_000).image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_encoder_schema(stack: Stack) -> None:
    url = stack.encoders[0].url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    assert_fuzzed(fuzz(schema, url), schema)
    response = httpx.post(f"{url}/v1/encode", content=scene_png(), headers={"content-type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text
    assert proto.decode(response.content, expect=proto.EncodeResponse).image.num_images == 1


def test_lm_worker_schema(stack: Stack) -> None:
    url = stack.lm_workers[0].url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    assert_fuzzed(fuzz(schema, url), schema)
    sampling = proto.SamplingParams(max_new_tokens=3, ignore_eos=True)
    request = proto.GenerateRequest(prompt="describe", sampling=sampling)
    response = httpx.post(f"{url}/v1/generate", content=proto.encode(request),
                          headers={"content-type": proto.CONTENT_TYPE}, timeout=30)
    assert response.status_code == 200, response.text
    assert len(proto.decode(response.content, expect=proto.GenerateResponse).token_ids) == 3


def test_gateway_schema(stack: Stack) -> None:
    document = httpx.get(f"{stack.url}/openapi.json", timeout=10).json()
    for path in ("/v1/chat/completions", "/v1/captions"):  # the raw-body JSON routes are described
        assert "application/json" in document["paths"][path]["post"]["requestBody"]["content"]
    schema = schemathesis.openapi.from_dict(document)
    assert_fuzzed(fuzz(schema, stack.url), schema)
    image = base64.b64encode(scene_png()).decode()
    response = httpx.post(f"{stack.url}/v1/captions", json={"image": image}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["captions"][0].startswith("a ")
