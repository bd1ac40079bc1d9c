"""`lodestar serve` and `lodestar search` as a newcomer runs them: two processes, real Ray,
the shipped models, a real gRPC connection."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

LODESTAR = [sys.executable, "-m", "lodestar.services.cli"]


def test_serve_then_search_prints_the_answer_and_serve_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [*LODESTAR, "serve", "--port", "0", "--threads", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            found = re.search(r"SERVING on (\S+:\d+)", log.read_text())
            address = found.group(1) if found else None
            time.sleep(0.2)
        search = subprocess.run(
            [*LODESTAR, "search", "(7+5)*3", "--address", address, "-n", "4"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert search.returncode == 0, search.stdout + search.stderr
        assert re.search(r"final answer\s+\d+", search.stdout)
        bad = subprocess.run(
            [*LODESTAR, "search", "(7+5)*3", "--address", address, "-p", "n=0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT: params.pf.n" in bad.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0, log.read_text()
    assert "shutting down" in log.read_text()
