"""The decoupled system against the monolithic pipeline, through the public API."""

from __future__ import annotations

import argparse
import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from services.demo import evaluate
from services.demo.captions import score_captions
from services.demo.scenes import generate_scene

HELD_OUT_SEED = 7_700_000  # scene seeds the trainer never draws from


def png_bytes(scene) -> bytes:
    buffer = io.BytesIO()
    scene.image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def caption_via_api(client: httpx.Client, url: str, data: bytes) -> dict:
    response = client.post(f"{url}/v1/captions", files={"file": ("scene.png", data, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample's values matching the name and labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample_name = head.split("{", 1)[0]
        if sample_name != name:
            continue
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            total += float(value)
    return total


def test_captions_equal_the_in_process_pipeline_and_are_right(stack, reference):
    scenes = [generate_scene(HELD_OUT_SEED + i) for i in range(50)]
    images = [png_bytes(scene) for scene in scenes]
    expected = reference.caption(images)
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda data: caption_via_api(client, stack.url, data)["captions"][0], images))
    # Greedy decoding: the wire must not change a single caption.
    assert served == expected
    scores = score_captions(served, scenes)
    # Generous floor: the bundled model scores far higher on 500 scenes (README).
    assert scores["exact_match"] >= 0.85, scores
    assert min(scores[k] for k in ("shape", "colour", "size", "position")) >= 0.93, scores
    # The gateway reached both tiers over their call channels, not HTTP.
    ready = httpx.get(f"{stack.url}/ready", timeout=30).json()
    assert all(endpoint["rpc_port"] for tier in ("encoder", "lm") for endpoint in ready[tier]["endpoints"])
    encoded = sum(metric_value(httpx.get(f"{e.url}/metrics").text, "step37_encoder_requests_total", route="rpc:encode")
                  for e in stack.encoders)
    assert encoded >= len(images)


def test_openai_client_chat_completion_and_stream(stack, reference):
    scene = generate_scene(HELD_OUT_SEED + 100)
    data = png_bytes(scene)
    expected = reference.caption([data], prompt="describe the image <image>")[0]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "describe the image"},
        {"type": "image_url", "image_url": {"url": data_url(data)}},
    ]}]
    completion = client.chat.completions.create(model="step37-tiny", messages=messages, max_tokens=48)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 16

    chunks = list(client.chat.completions.create(model="step37-tiny", messages=messages, max_tokens=48,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    # The same image and text again: the LM worker started from the prompt's cached prefix.
    assert chunks[-1].usage.prompt_tokens == completion.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    # Both went over the LM worker's call channel, the stream as a streamed call.
    calls = "".join(httpx.get(f"{w.url}/metrics", timeout=30).text for w in stack.lm_workers)
    assert metric_value(calls, "lm_worker_channel_calls_total", method="generate:stream", code="200") >= 1
    assert metric_value(calls, "lm_worker_channel_calls_total", method="generate", code="200") >= 1


def test_a_follow_up_turn_about_one_image_reuses_its_features_and_its_prefix(stack):
    data = png_bytes(generate_scene(HELD_OUT_SEED + 260))
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)

    def found_by_name() -> float:
        sent = metric_value(httpx.get(f"{stack.url}/metrics").text, "step37_gateway_lm_features_total", how="by_name")
        found = sum(metric_value(httpx.get(f"{w.url}/metrics").text, "lm_worker_feature_refs_total", result="hit")
                    for w in stack.lm_workers)
        assert sent == found  # this stack's only gateway names them; every name was found
        return found

    turn = [{"role": "user", "content": [{"type": "text", "text": "describe the image"},
                                         {"type": "image_url", "image_url": {"url": data_url(data)}}]}]
    first = client.chat.completions.create(model="step37-tiny", messages=turn, max_tokens=48)
    found = found_by_name()
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "describe the image"}]
    second = client.chat.completions.create(model="step37-tiny", messages=turn, max_tokens=48)
    # The image went by name, and the second prompt started from every whole block of the first.
    assert found_by_name() == found + 1
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // 16 * 16 > 0


def test_repeated_image_is_served_from_the_cache(stack):
    data = png_bytes(generate_scene(HELD_OUT_SEED + 200))
    with httpx.Client(timeout=120) as client:
        first = caption_via_api(client, stack.url, data)

        def encoder_requests() -> float:
            return sum(metric_value(client.get(f"{e.url}/metrics").text, "step37_encoder_images_total")
                       for e in stack.encoders)

        def named_features_found() -> float:
            return sum(metric_value(client.get(f"{w.url}/metrics").text, "lm_worker_feature_refs_total", result="hit")
                       for w in stack.lm_workers)

        before, found = encoder_requests(), named_features_found()
        second = caption_via_api(client, stack.url, data)
        assert encoder_requests() == before, "the encoder was called for a cached image"
        assert named_features_found() == found + 1, "the features went to the LM worker again, not by name"
    assert second["captions"] == first["captions"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < second["usage"]["prompt_tokens_details"]["cached_tokens"] < second["usage"]["prompt_tokens"]
    gateway_metrics = httpx.get(f"{stack.url}/metrics").text
    assert metric_value(gateway_metrics, "step37_gateway_cache_hits_total") >= 1


def test_a_cache_salt_shares_cached_work_only_within_its_salt(stack):
    data = base64.b64encode(png_bytes(generate_scene(HELD_OUT_SEED + 250))).decode()
    with httpx.Client(timeout=120) as client:
        def caption(**extra) -> tuple[str, int, float]:
            response = client.post(f"{stack.url}/v1/captions", json={"image": data, **extra})
            assert response.status_code == 200, response.text
            body = response.json()
            encoded = sum(metric_value(client.get(f"{e.url}/metrics").text, "step37_encoder_images_total")
                          for e in stack.encoders)
            return body["captions"][0], body["usage"]["prompt_tokens_details"]["cached_tokens"], encoded

        text, cached, encoded = caption()
        assert cached == 0
        # Another tenant's salt: neither the gateway's features nor the worker's prefix.
        assert caption(cache_salt="tenant-a") == (text, 0, encoded + 1)
        salted_again = caption(cache_salt="tenant-a")
        assert salted_again[0] == text and salted_again[1] > 0 and salted_again[2] == encoded + 1
        assert caption(cache_salt="tenant-b")[1:] == (0, encoded + 2)
        unsalted_again = caption()
        assert unsalted_again[1] > 0 and unsalted_again[2] == encoded + 2
        refused = client.post(f"{stack.url}/v1/captions", json={"image": data, "cache_salt": ""})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"


def test_eval_demo_scores_a_running_system_against_the_in_process_pipeline(stack, tmp_path):
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "eval.json"
    args = parser.parse_args(["--url", stack.url, "--scenes", "8", "--seed", "31", "--compare-in-process",
                              "--device", "cpu", "--out", str(out)])
    assert evaluate.run(args) == 0
    report = json.loads(out.read_text())
    assert report["scenes"] == 8 and report["url"] == stack.url
    assert report["device"] is None and report["cuda"] is None  # a running system's device is its own
    assert report["captions_differing"] == 0
    assert report["decoupled"] == report["in_process"]
    assert report["decoupled"]["exact_match"] >= 0.5


def test_killing_an_encoder_replica_loses_no_request(stack):
    """Last in the file on purpose: it leaves the session's stack with one encoder."""
    scenes = [png_bytes(generate_scene(HELD_OUT_SEED + 300 + i)) for i in range(24)]
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(caption_via_api, client, stack.url, data) for data in scenes]
        futures[3].result()  # traffic is flowing
        stack.encoders[0].kill()
        results = [future.result() for future in futures]
    assert all(len(result["captions"]) == 1 for result in results)
