"""The encoder service: the Step3.7 vision tower behind a dynamic batcher and HTTP.

Layers, outermost first: ``app`` (ASGI app, lifespan) -> ``router`` (native routes) and
``kserve`` (KServe v2 / Triton routes) -> ``protocol`` / ``kserve_protocol`` (request
and response formats) -> ``serving`` (`EncoderService`) -> ``batcher`` -> ``model``
(torch only) and ``preprocess``. Run it with ``step37-serve encoder``.
"""
