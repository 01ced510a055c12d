"""The workload: image sources, the reuse ratio, and the request bodies."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from services.loadtest.errors import ConfigError
from services.loadtest.images import DirectoryImages, GeneratedImages
from services.loadtest.workload import ReusePlanner, Workload, WorkloadConfig


@pytest.mark.parametrize("reuse", [0.0, 0.5, 0.9])
def test_reuse_planner_repeats_images_at_the_requested_ratio(reuse: float) -> None:
    planner = ReusePlanner(reuse, reuse_window=64, rng=random.Random(7))
    slots = [planner.next_slot() for _ in range(5000)]
    ratio = sum(reused for _, reused in slots) / len(slots)
    assert ratio == pytest.approx(reuse, abs=0.025)
    assert slots[0] == (0, False)  # nothing to repeat yet
    fresh = [index for index, reused in slots if not reused]
    assert fresh == list(range(len(fresh)))  # fresh images are numbered in order, never repeated


def test_reuse_planner_repeats_only_from_the_recent_window() -> None:
    planner = ReusePlanner(0.5, reuse_window=8, rng=random.Random(1))
    for _ in range(2000):
        fresh_before = planner.fresh_count
        index, reused = planner.next_slot()
        if reused:
            assert fresh_before - 8 <= index < fresh_before


def _workload(tmp_config: dict | None = None, **source: object) -> Workload:
    config = WorkloadConfig(**(tmp_config or {}))
    return Workload(config, GeneratedImages(**{"kind": "noise", "image_size": 8, **source}))


@pytest.mark.parametrize("reuse", [0.0, 0.5, 0.9])
def test_workload_sends_repeated_bytes_at_the_requested_ratio(reuse: float) -> None:
    workload = _workload({"reuse": reuse, "images_per_request": 2, "seed": 3})
    specs = [workload.next_request() for _ in range(600)]
    seen: set[str] = set()
    repeats = 0
    for spec in specs:
        for image_id in spec.image_ids:
            repeats += image_id in seen
            seen.add(image_id)
    assert sum(spec.reused_images for spec in specs) == repeats  # the records' count is the bytes' truth
    assert repeats / 1200 == pytest.approx(reuse, abs=0.05)
    assert [spec.index for spec in specs] == list(range(600))


def _decoded_images(spec_body: bytes) -> list[tuple[str, Image.Image]]:
    payload = json.loads(spec_body)
    parts = payload["messages"][0]["content"]
    images = []
    for part in parts:
        if part["type"] == "image_url":
            header, data = part["image_url"]["url"].split(",", 1)
            images.append((header, Image.open(io.BytesIO(base64.b64decode(data)))))
    return images


@pytest.mark.parametrize(("image_format", "pillow_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_chat_body_carries_data_urls_in_the_requested_format(image_format: str, pillow_format: str) -> None:
    workload = _workload({"images_per_request": 2, "model": "m", "max_tokens": 7},
                         image_size=40, image_format=image_format)
    spec = workload.next_request()
    assert spec.content_type == "application/json" and not spec.stream
    payload = json.loads(spec.body)
    assert (payload["model"], payload["max_tokens"], payload["stream"]) == ("m", 7, False)
    assert "stream_options" not in payload
    assert payload["messages"][0]["content"][-1] == {"type": "text", "text": "Describe the image."}
    images = _decoded_images(spec.body)
    assert len(images) == 2
    for header, image in images:
        assert header == f"data:image/{image_format};base64"
        assert (image.format, image.size) == (pillow_format, (40, 40))


def test_streamed_chat_asks_for_usage_and_takes_extra_fields() -> None:
    workload = _workload({"stream": True, "extra_body": {"ignore_eos": True, "max_tokens": 5}})
    spec = workload.next_request()
    payload = json.loads(spec.body)
    assert spec.stream and payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert payload["ignore_eos"] is True and payload["max_tokens"] == 5  # extra body wins
    assert "model" not in payload


def test_captions_bodies_multipart_and_json() -> None:
    multipart = _workload({"endpoint": "captions", "images_per_request": 3}).next_request()
    assert multipart.content_type.startswith("multipart/form-data; boundary=")
    assert multipart.body.count(b'name="file"') == 3
    as_json = _workload({"endpoint": "captions", "captions_body": "json", "images_per_request": 2}).next_request()
    images = json.loads(as_json.body)["images"]
    assert [Image.open(io.BytesIO(base64.b64decode(image))).size for image in images] == [(8, 8), (8, 8)]


def test_generated_images_are_repeatable() -> None:
    scenes = GeneratedImages("scenes", 48, "png", seed=5)
    assert scenes.image(3) == GeneratedImages("scenes", 48, "png", seed=5).image(3)
    assert scenes.image(3).image_id != scenes.image(4).image_id
    noise = GeneratedImages("noise", 16, "png", seed=1)
    assert noise.image(0) == noise.image(0) and noise.image(0) != noise.image(1)


def test_directory_images_are_sent_as_they_are_and_cycles_count_as_reuse(tmp_path: Path) -> None:
    for index, colour in enumerate(("red", "blue")):
        Image.new("RGB", (10, 12), colour).save(tmp_path / f"{index}.jpg", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    source = DirectoryImages(tmp_path)
    assert source.image(0).data == (tmp_path / "0.jpg").read_bytes()
    assert source.image(0).mime_type == "image/jpeg"
    workload = Workload(WorkloadConfig(), source)
    assert [workload.next_request().reused_images for _ in range(4)] == [0, 0, 1, 1]


def test_impossible_settings_are_refused_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="images_dir"):
        DirectoryImages(tmp_path)  # empty
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="not a readable image"):
        DirectoryImages(tmp_path)
    with pytest.raises(ConfigError, match="image_size"):
        GeneratedImages("scenes", 16)
    with pytest.raises(ConfigError, match="image_format"):
        GeneratedImages("noise", 16, "gif")
    for bad in ({"reuse": 1.0}, {"endpoint": "completions"}, {"max_tokens": 0},
                {"endpoint": "captions", "images_per_request": 0}, {"captions_body": "xml"}):
        with pytest.raises(ConfigError):
            WorkloadConfig(**bad)
