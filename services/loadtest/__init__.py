"""Load-test client for OpenAI-compatible chat endpoints with images, and ``/v1/captions``.

Modules, in the order a request flows through them:

- ``images``: where pictures come from (a directory, demo scenes, noise);
- ``workload``: the request sequence, with a controlled image-reuse ratio, bodies pre-encoded;
- ``feed``: request bodies built ahead in a worker thread, out of the measurement;
- ``runner``: load points (closed loop at a concurrency, open loop at a Poisson rate),
  warm-up, hard deadlines, a progress bar;
- ``client`` and ``protocol``: one request sent and its answer read (JSON or SSE,
  ``Server-Timing`` and ``timings``), every outcome recorded;
- ``records``, ``stats``: per-request records and the statistics computed from them;
- ``report``, ``plots``: JSON with every record, a table, PNG plots;
- ``cli``: ``step37-serve loadtest`` and ``python -m services.loadtest``;
- ``mock_server``: a scripted OpenAI-compatible server, for the tests and for measuring
  the client's own ceiling.

Errors are described in ``errors``. Programmatic use::

    workload = Workload(WorkloadConfig(stream=True, reuse=0.5), GeneratedImages())
    tester = LoadTester(RunSettings(url="http://127.0.0.1:8000/v1/chat/completions", requests=50), workload)
    results = asyncio.run(tester.run([LoadPoint(concurrency=4)]))
    summary = summarize(results[0].records)
"""

from services.loadtest.errors import ConfigError, LoadTestError
from services.loadtest.images import DirectoryImages, GeneratedImages
from services.loadtest.records import RequestRecord
from services.loadtest.runner import LoadPoint, LoadTester, PointResult, RunSettings
from services.loadtest.stats import summarize
from services.loadtest.workload import Workload, WorkloadConfig

__all__ = [
    "ConfigError",
    "DirectoryImages",
    "GeneratedImages",
    "LoadPoint",
    "LoadTestError",
    "LoadTester",
    "PointResult",
    "RequestRecord",
    "RunSettings",
    "Workload",
    "WorkloadConfig",
    "summarize",
]
