"""Every malformed request the public API can be sent, to a real gateway in front of a
real encoder and LM worker (the launcher's ``Stack``, as the end-to-end tests start it).

One table for ``/v1/chat/completions`` and ``/v1/captions``: images (broken, bombs, too
large, wrong media types, bad data URLs and base64), remote image URLs (hosts off the
allow-list, loopback and metadata addresses, credentials, other schemes), content
parts, roles, JSON types and every bound, each row with the status and the ``param``
its OpenAI-shaped error must name. Some rows are refused by the gateway, some by the
encoder or the LM worker behind it; all must be a 4xx. The gateway runs without a
feature cache, so after every row the valid request goes through all three services
and must get the caption it got before the first.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from malformed import BROKEN_IMAGES, JPEG, PNG, multipart, png_declaring

from services.demo.scenes import generate_scene
from services.launcher import BUNDLED_MODEL, Stack, StackConfig

MAX_BODY_BYTES = 1 << 20
MAX_IMAGE_BYTES = 256 << 10
MAX_IMAGES = 4
MAX_PIXELS = 4_000_000
MAX_PROMPT_CHARS = 2000
MAX_TOKENS = 32
CHAT = "/v1/chat/completions"
CAPTIONS = "/v1/captions"
IMAGE_PARAM = "messages[0].content[1].image_url.url"  # the image part of chat()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = StackConfig(
        model=str(BUNDLED_MODEL), device="cpu", log_dir=str(tmp_path_factory.mktemp("stack-logs")),
        encoder_args=["--max-queue-delay-ms", "1"], lm_args=["--max-batch-size", "2"],
        gateway_args=["--cache-bytes", "0", "--max-body-bytes", str(MAX_BODY_BYTES),
                      "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-images", str(MAX_IMAGES),
                      "--max-pixels", str(MAX_PIXELS), "--max-prompt-chars", str(MAX_PROMPT_CHARS),
                      "--max-tokens", str(MAX_TOKENS), "--default-max-tokens", "8",
                      "--allowed-url-hosts", "localhost"])
    with Stack(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        yield client


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def scene_png() -> bytes:
    buffer = io.BytesIO()
    generate_scene(9_100_000).image.save(buffer, format="PNG")
    return buffer.getvalue()


def chat(*parts: dict, **fields) -> dict:
    """A user message of a text part followed by ``parts``; ``fields`` beside ``messages``."""
    content = [{"type": "text", "text": "describe the image"}, *parts]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS, **fields}


def image_part(url: str, **fields) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **fields}}


def ask(http: httpx.Client) -> str:
    """The valid request: a scene to caption; the first four tokens are compared."""
    response = http.post(CHAT, json=chat(image_part(data_url(SCENE)), max_tokens=4))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


SCENE = scene_png()


@pytest.fixture(scope="module")
def reference(http: httpx.Client) -> str:
    """The valid request's caption before any bad input arrived."""
    caption = ask(http)
    assert caption.startswith("a "), caption  # the bundled captioner's grammar
    return caption


def assert_still_serving(http: httpx.Client, reference: str) -> None:
    assert ask(http) == reference


# ---- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A bad request and the OpenAI-shaped refusal it must get (``param`` may be None)."""

    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    status: int
    param: str | None
    fragment: str


JSON = (("content-type", "application/json"),)


def bad_chat(body: object, status: int, param: str | None, fragment: str, *, raw: bytes | None = None,
             headers: tuple[tuple[str, str], ...] = JSON) -> Bad:
    return Bad(CHAT, json.dumps(body).encode() if raw is None else raw, headers, status, param, fragment)


def bad_image(url: str, status: int, fragment: str, param: str = IMAGE_PARAM) -> Bad:
    return bad_chat(chat(image_part(url)), status, param, fragment)


def bad_caption(body: object, status: int, param: str | None, fragment: str) -> Bad:
    return Bad(CAPTIONS, json.dumps(body).encode(), JSON, status, param, fragment)


def bad_form(files: list[tuple[str, bytes]], fields: dict[str, str] | None, status: int, param: str | None,
             fragment: str) -> Bad:
    body, headers = multipart(files, fields)
    return Bad(CAPTIONS, body, tuple(headers.items()), status, param, fragment)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# What the gateway's header check says of each broken file, or (the truncated ones,
# whose headers are fine) what the encoder says, relayed under the request's field.
BROKEN = {
    "not an image": "not a readable JPEG, PNG, WebP or GIF image",
    "truncated png": "truncated or corrupt PNG",
    "truncated jpeg": "truncated or corrupt JPEG",
    "png header only": "not a readable",
    "png header crc wrong": "not a readable",
    "png declaring 0x0": "not a readable",
    "tiff (format not allowed)": "not a readable JPEG, PNG, WebP or GIF image",
    "png text-chunk bomb": "not a readable",
}
TEXT = {"type": "text", "text": "hi"}

BAD: dict[str, Bad] = {
    # -- images --
    **{f"image {name}": bad_image(data_url(data), 400, BROKEN[name]) for name, data in BROKEN_IMAGES.items()},
    "image empty": bad_image("data:image/png;base64,", 400, "the image is empty"),
    # The encoder numbers the images it is sent (duplicates once): images[1] here is part 3.
    "image truncated after a repeated one": bad_chat(chat(*[image_part(data_url(PNG))] * 2, image_part(
        data_url(BROKEN_IMAGES["truncated png"]))), 400, "messages[0].content[3].image_url.url",
        "images[1]: truncated or corrupt PNG"),
    "image decompression bomb header": bad_image(data_url(png_declaring(100_000, 100_000)), 422,
                                                 "decompression bomb"),
    "image over max-pixels": bad_image(data_url(png_declaring(3000, 2000)), 422, f"limit of {MAX_PIXELS}"),
    "image with a side over 16384 px (the encoder's bound)": bad_image(data_url(png_declaring(20_000, 100)), 413,
                                                                       "side over 16384"),
    "image over max-image-bytes": bad_image(data_url(PNG + b"\0" * MAX_IMAGE_BYTES), 413, f"{MAX_IMAGE_BYTES}"),
    "media type svg": bad_image(data_url(b"<svg/>", "image/svg+xml"), 400, "media type 'image/svg+xml'"),
    "media type bmp": bad_image(data_url(PNG, "image/bmp"), 400, "media type 'image/bmp'"),
    "data url without base64": bad_image("data:image/png,abc", 400, "only base64"),
    "data url without a comma": bad_image("data:image/png;base64", 400, "not a data URL"),
    "not base64": bad_image("data:image/png;base64,@@@@", 400, "not valid base64"),
    "base64 without padding": bad_image("data:image/png;base64,AAA", 400, "not valid base64"),
    "base64 not ascii": bad_image("data:image/png;base64,ééé", 400, "non-ASCII"),
    # -- remote image URLs: nothing off the allow-list (just "localhost") is fetched --
    "cloud metadata address": bad_image("http://169.254.169.254/latest/meta-data/", 400, "not allowed"),
    "loopback by address": bad_image("http://127.0.0.1:8001/ready", 400, "host '127.0.0.1' is not allowed"),
    "loopback ipv6": bad_image("http://[::1]/a.png", 400, "host '::1' is not allowed"),
    "public host": bad_image("https://example.com/cat.png", 400, "host 'example.com' is not allowed"),
    "allowed host with credentials": bad_image("http://user:secret@localhost/a.png", 400, "credentials"),
    "file url": bad_image("file:///etc/passwd", 400, "data: URLs or http(s) URLs"),
    "gopher url": bad_image("gopher://localhost:6379/_INFO", 400, "data: URLs or http(s) URLs"),
    "scheme-relative url": bad_image("//localhost/a.png", 400, "data: URLs or http(s) URLs"),
    "unclosed ipv6 bracket": bad_image("http://[::1/a.png", 400, "not a valid URL"),
    "allowed host, port not a number": bad_image("http://localhost:http/a.png", 400, "could not download"),
    "allowed host, nothing listening": bad_image("http://localhost:1/a.png", 400, "could not download"),
    # -- content parts --
    "part of an unknown type": bad_chat(chat({"type": "input_audio", "input_audio": {"data": "x"}}), 400,
                                        "messages[0].content[1].type", "'text' or 'image_url'"),
    "part not an object": bad_chat(chat("just text"), 400, "messages[0].content[1]", "object"),
    "text part without text": bad_chat(chat({"type": "text"}), 400, "messages[0].content[1]", "'text' field"),
    "text part an int": bad_chat(chat({"type": "text", "text": 5}), 400, "messages[0].content[1].text",
                                 "valid string"),
    "image part without image_url": bad_chat(chat({"type": "image_url"}), 400, "messages[0].content[1]",
                                             "'image_url' field"),
    "image_url a string": bad_chat(chat({"type": "image_url", "image_url": data_url(PNG)}), 400,
                                   "messages[0].content[1].image_url", "object"),
    "image url null": bad_chat(chat({"type": "image_url", "image_url": {"url": None}}), 400, IMAGE_PARAM,
                               "valid string"),
    "image url empty": bad_image("", 400, "at least 1 character"),
    "image detail unknown": bad_chat(chat(image_part(data_url(PNG), detail="ultra")), 400,
                                     "messages[0].content[1].image_url.detail", "'auto', 'low' or 'high'"),
    "content an int": bad_chat({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
                               "valid string"),
    "image in an assistant message": bad_chat({"messages": [{"role": "assistant", "content": [
        image_part(data_url(PNG))]}]}, 400, "messages[0].content[0]", "user messages only"),
    "text with the image placeholder": bad_chat({"messages": [{"role": "user", "content": "look: <image>"}]}, 400,
                                                "messages[0].content", "reserved placeholder"),
    "text with a special token (the worker refuses)": bad_chat(
        {"messages": [{"role": "user", "content": "hi <im_patch>"}]}, 400, None, "special tokens"),
    # -- messages and roles --
    "unknown role": bad_chat({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role",
                             "'system', 'developer', 'user' or 'assistant'"),
    "role tool": bad_chat({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role", "'user'"),
    "no role": bad_chat({"messages": [{"content": "hi"}]}, 400, "messages[0].role", "Field required"),
    "no messages": bad_chat({"model": "step37-tiny"}, 400, "messages", "Field required"),
    "messages empty": bad_chat({"messages": []}, 400, "messages", "at least 1 item"),
    "messages a string": bad_chat({"messages": "hi"}, 400, "messages", "valid array"),
    "message a string": bad_chat({"messages": ["hi"]}, 400, "messages[0]", "object"),
    "nothing to respond to": bad_chat({"messages": [{"role": "user", "content": ""}]}, 400, "messages",
                                      "no text or image"),
    # -- JSON types, numbers and bounds --
    "max_tokens zero": bad_chat(chat(max_tokens=0), 400, "max_tokens", "greater than or equal to 1"),
    "max_tokens over the cap": bad_chat(chat(max_tokens=MAX_TOKENS + 1), 422, "max_tokens",
                                        f"the limit is {MAX_TOKENS}"),
    "max_tokens past int64": bad_chat(chat(max_tokens=10**40), 422, "max_tokens", f"the limit is {MAX_TOKENS}"),
    "max_tokens a string": bad_chat(chat(max_tokens="4"), 400, "max_tokens", "valid integer"),
    "max_tokens true": bad_chat(chat(max_tokens=True), 400, "max_tokens", "valid integer"),
    "max_tokens a fraction": bad_chat(chat(max_tokens=1.5), 400, "max_tokens", "valid integer"),
    "max_completion_tokens zero": bad_chat(chat(max_completion_tokens=0), 400, "max_completion_tokens",
                                           "greater than or equal to 1"),
    "temperature 3": bad_chat(chat(temperature=3), 400, "temperature", "less than or equal to 2"),
    "temperature a string": bad_chat(chat(temperature="hot"), 400, "temperature", "valid number"),
    "temperature NaN": bad_chat(None, 400, "temperature", "temperature", raw=json.dumps(
        chat(temperature=float("nan"))).encode()),
    "top_p zero": bad_chat(chat(top_p=0), 400, "top_p", "greater than 0"),
    "seed negative": bad_chat(chat(seed=-1), 400, "seed", "greater than or equal to 0"),
    "seed past int64": bad_chat(chat(seed=2**64), 400, "seed", "less than or equal to 9223372036854775807"),
    "five stop sequences": bad_chat(chat(stop=["a"] * 5), 400, "stop", "at most 4"),
    "empty stop sequence": bad_chat(chat(stop=[""]), 400, "stop", "non-empty"),
    "stop a number": bad_chat(chat(stop=5), 400, "stop", "valid string"),
    "stop too long (the worker refuses)": bad_chat(chat(stop=["x" * 1000]), 400, None, "longer than 256"),
    "stream a string": bad_chat(chat(stream="yes"), 400, "stream", "valid boolean"),
    "stream_options not an object": bad_chat(chat(stream=True, stream_options=5), 400, "stream_options", "object"),
    "n of 2": bad_chat(chat(n=2), 400, "n", "only n=1"),
    "model not served": bad_chat(chat(model="gpt-4o"), 404, "model", "not served here"),
    "model an int": bad_chat(chat(model=5), 400, "model", "valid string"),
    "user an int": bad_chat(chat(user=5), 400, "user", "valid string"),
    "too many images": bad_chat(chat(*[image_part(data_url(PNG))] * (MAX_IMAGES + 1)), 422, "messages",
                                f"the limit is {MAX_IMAGES}"),
    "prompt over max-prompt-chars": bad_chat({"messages": [{"role": "user", "content": "x " * MAX_PROMPT_CHARS}]},
                                             422, "messages", f"the limit is {MAX_PROMPT_CHARS}"),
    "streamed with a broken image": bad_chat(chat(image_part(data_url(b"GIF89a")), stream=True), 400, IMAGE_PARAM,
                                             "not a readable"),
    # -- the body as a whole --
    "body over max-body-bytes": bad_chat(None, 413, "body", "exceeds the limit", raw=b" " * (MAX_BODY_BYTES + 1)),
    "body not json": bad_chat(None, 400, None, "Invalid JSON", raw=b"{nope"),
    "body empty": bad_chat(None, 400, None, "Invalid JSON", raw=b""),
    "body a json array": bad_chat([TEXT], 400, None, "object"),
    "body nested 100000 deep": bad_chat(None, 400, None, "recursion limit",
                                        raw=b"[" * 100_000 + b"]" * 100_000),
    "body not utf-8": bad_chat(None, 400, None, "Invalid JSON", raw=b'{"messages": "\xff"}'),
    "gzip that is not gzip": bad_chat(None, 400, "content-encoding", "not valid gzip", raw=b"\x1f\x8bnope",
                                      headers=(*JSON, ("content-encoding", "gzip"))),
    "gzip inflating past the limit": bad_chat(None, 413, "body", "inflated", raw=gzip.compress(
        b" " * (2 * MAX_BODY_BYTES)), headers=(*JSON, ("content-encoding", "gzip"))),
    # -- captions, JSON --
    "captions without an image": bad_caption({}, 400, None, "exactly one of 'image' or 'images'"),
    "captions with image and images": bad_caption({"image": b64(PNG), "images": [b64(PNG)]}, 400, None,
                                                  "exactly one of"),
    "captions image an int": bad_caption({"image": 5}, 400, "image", "valid string"),
    "captions images empty": bad_caption({"images": []}, 400, "images", "at least 1 item"),
    "captions image not base64": bad_caption({"image": "%%%"}, 400, "image", "not valid base64"),
    "captions image not an image": bad_caption({"image": b64(b"hello")}, 400, "image", "not a readable"),
    "captions second image broken": bad_caption({"images": [b64(PNG), b64(BROKEN_IMAGES["truncated jpeg"])]}, 400,
                                                "images[1]", "truncated or corrupt JPEG"),
    "captions image a remote url": bad_caption({"image": "http://169.254.169.254/"}, 400, "image",
                                               "not valid base64"),
    "captions too many images": bad_caption({"images": [b64(PNG)] * (MAX_IMAGES + 1)}, 422, "images",
                                            f"the limit is {MAX_IMAGES}"),
    "captions prompt with two placeholders": bad_caption({"image": b64(PNG), "prompt": "<image> <image>"}, 400,
                                                         "prompt", "at most one <image>"),
    "captions max_tokens a string": bad_caption({"image": b64(PNG), "max_tokens": "8"}, 400, "max_tokens",
                                                "valid integer"),
    "captions max_tokens over the cap": bad_caption({"image": b64(PNG), "max_tokens": 1000}, 422, "max_tokens",
                                                    f"the limit is {MAX_TOKENS}"),
    "captions temperature negative": bad_caption({"image": b64(PNG), "temperature": -1}, 400, "temperature",
                                                 "greater than or equal to 0"),
    # -- captions, multipart --
    "form without files": bad_form([], {"prompt": "x"}, 400, "images", "no image to caption"),
    "form file broken": bad_form([("file", b"nope")], None, 400, "file[0]", "not a readable"),
    "form file empty": bad_form([("file", b"")], None, 400, "file[0]", "the image is empty"),
    "form second file truncated": bad_form([("file", JPEG), ("file", BROKEN_IMAGES["truncated png"])], None, 400,
                                           "file[1]", "truncated or corrupt PNG"),
    "form max_tokens not a number": bad_form([("file", PNG)], {"max_tokens": "many"}, 400, "max_tokens",
                                             "valid integer"),
    "form too many files": bad_form([("file", PNG)] * (MAX_IMAGES + 2), None, 400, None, "Too many files"),
    "form too many fields": bad_form([("file", PNG)], {f"field{i}": "x" for i in range(20)}, 400, None,
                                     "Too many fields"),
    "form field over 64 KB": bad_form([("file", PNG)], {"prompt": "x" * 70_000}, 400, None, "exceeded maximum size"),
    "form without boundary": Bad(CAPTIONS, b"--x\r\n", (("content-type", "multipart/form-data"),), 400, None,
                                 "boundary"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_an_openai_4xx_naming_the_param_and_the_system_keeps_serving(
        http: httpx.Client, reference: str, case: str) -> None:
    bad = BAD[case]
    response = http.post(bad.path, content=bad.body, headers=dict(bad.headers))
    assert response.status_code == bad.status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == bad.param and bad.fragment in error["message"], error
    assert_still_serving(http, reference)


def test_unknown_model_route_is_404_naming_the_model(http: httpx.Client, reference: str) -> None:
    response = http.get("/v1/models/gpt-4o")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert_still_serving(http, reference)


ACCEPTED = {
    "jpeg declared as image/png (the bytes decide)": data_url(JPEG, "image/png"),
    "png declared as image/jpg": data_url(PNG, "image/jpg"),
    "data url with line breaks in the base64": "data:image/png;base64," + "\n".join(
        b64(PNG)[i:i + 76] for i in range(0, len(b64(PNG)), 76)),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_loose_but_valid_images_are_accepted(http: httpx.Client, reference: str, case: str) -> None:
    response = http.post(CHAT, json=chat(image_part(ACCEPTED[case]), max_tokens=4))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert_still_serving(http, reference)
