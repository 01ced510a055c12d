"""``step37-serve up``: the whole system as children, and none left behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import pytest

from services.demo.checkpoint import random_checkpoint


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_then_stops_every_child(tmp_path, stop_signal):
    model = random_checkpoint(tmp_path / "step37-tiny", seed=3)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--model", str(model), "--port", "0", "--device", "cpu",
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    urls: dict[str, str] = {}
    try:
        for line in launcher.stdout:  # pytest-timeout bounds this if the launcher hangs
            if match := re.match(r"(\S+)\s+(http://127\.0\.0\.1:\d+)", line):
                urls[match.group(1)] = match.group(2)
            if line.startswith("Ctrl-C"):
                break
        assert set(urls) == {"gateway", "encoder-0", "lm-worker-0"}, urls
        with httpx.Client(timeout=30) as client:
            for url in urls.values():
                assert client.get(f"{url}/ready").status_code == 200
        launcher.send_signal(stop_signal)
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    for url in urls.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
