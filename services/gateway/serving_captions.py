"""``/v1/captions``: one caption per image, the simple endpoint for captioning jobs.

All of a request's images go through the cache and (for the misses) one encoder call;
then each image gets its own generate call — one sequence per image is what the
worker batches best, and a caption must not depend on which other images came along.
The prompt is ``<image>`` alone by default, the same template the in-process
reference pipeline and the trainer use, so greedy captions match it exactly.
"""

from __future__ import annotations

from proto import GenerateRequest, GenerateResponse
from services.gateway.errors import InvalidRequest, ServiceUnavailable
from services.gateway.features import features_name, join_encoded
from services.gateway.protocol import IMAGE_PLACEHOLDER, CaptionResponse, Usage
from services.gateway.serving import ImageSource, Pipeline, gather_or_cancel
from services.gateway.timing import StageTimer

__all__ = ["CaptionService", "caption_prompt"]


def caption_prompt(prompt: str | None) -> str:
    """``<image>`` plus the caller's text; the text may place the image with one ``<image>``."""
    text = (prompt or "").strip()
    count = text.count(IMAGE_PLACEHOLDER)
    if count > 1:
        raise InvalidRequest(f"prompt: at most one {IMAGE_PLACEHOLDER} (each request image is captioned on its own)",
                             param="prompt")
    if count == 1:
        return text
    return f"{IMAGE_PLACEHOLDER} {text}".strip()


class CaptionService:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def caption(self, sources: list[ImageSource], *, prompt: str | None, max_tokens: int | None,
                      temperature: float | None, request_id: str, timer: StageTimer,
                      cache_salt: str | None = None) -> CaptionResponse:
        pipeline = self.pipeline
        model = pipeline.settings.model_name
        if not sources:
            raise InvalidRequest("no image to caption: upload files or send 'image' / 'images'", param="images")
        pipeline.check_image_count(len(sources), "images")
        text = caption_prompt(prompt)
        pipeline.check_prompt(text, "prompt")
        sampling = pipeline.sampling(max_tokens=max_tokens, temperature=temperature)

        async def run() -> CaptionResponse:
            images = await pipeline.load_images(sources, timer)
            features = await pipeline.features(images, timer, request_id=request_id, cache_salt=cache_salt)
            requests = [GenerateRequest(prompt=text, images=[join_encoded([encoded])], sampling=sampling,
                                        request_id=f"{request_id}-{i}", timings=timer.as_dict(),
                                        cache_salt=cache_salt, feature_refs=[features_name([encoded], cache_salt)])
                        for i, encoded in enumerate(features)]
            results: list[GenerateResponse] = await gather_or_cancel(
                [pipeline.generate(request, timer) for request in requests])
            if any(result.finish_reason == "abort" for result in results):
                raise ServiceUnavailable("the LM worker aborted a generation; retry")
            prompt_tokens = sum(result.prompt_tokens for result in results)
            completion_tokens = sum(result.completion_tokens for result in results)
            pipeline.finish(timer, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            return CaptionResponse(
                id=f"caption-{request_id}", model=model, captions=[result.text for result in results],
                finish_reasons=[result.finish_reason for result in results],
                usage=Usage.of(prompt_tokens, completion_tokens, sum(result.cached_tokens for result in results)),
                timings=timer.as_dict())

        return await pipeline.with_deadline(run())
