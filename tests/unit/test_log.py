"""In JSON mode every line on stderr is one JSON object: ours, the libraries', and crashes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import REPO_ROOT

REPO = REPO_ROOT

SCRIPT = """
import asyncio, logging, threading, warnings
import structlog
from edge_agent.log import setup_logging

setup_logging("info", "json")
structlog.get_logger("agent").info("ours", n=1)
logging.getLogger("asyncua.client.ua_client").warning("plain text from a library: %s", "x")
logging.getLogger("asyncua").info("chatter below the library's level is dropped")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("asyncio").exception("Task exception was never retrieved")
warnings.warn("a deprecated call", DeprecationWarning, stacklevel=1)
t = threading.Thread(target=lambda: [][1], name="reader-thread")
t.start(); t.join()

async def orphan():
    raise RuntimeError("nobody awaits me")

async def main():
    asyncio.get_running_loop().create_task(orphan())
    await asyncio.sleep(0.01)

asyncio.run(main())
import gc; gc.collect()
raise SystemError("the end")
"""


def test_every_stderr_line_is_json_including_library_records_and_tracebacks() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\n{out.stderr}") from None
    by_event = {r["event"]: r for r in records}
    assert by_event["ours"]["level"] == "info" and by_event["ours"]["n"] == 1
    library = by_event["plain text from a library: x"]
    assert library["level"] == "warning" and library["logger"] == "asyncua.client.ua_client"
    assert "timestamp" in library
    assert not any("chatter" in r["event"] for r in records)
    assert "ZeroDivisionError" in by_event["Task exception was never retrieved"]["exception"]
    assert any("a deprecated call" in r["event"] for r in records)
    thread = by_event["uncaught exception in a thread: the thread ends"]
    assert thread["thread"] == "reader-thread" and "IndexError" in thread["exception"]
    assert any("nobody awaits me" in r.get("exception", "") for r in records)
    crash = by_event["uncaught exception: the process ends"]
    assert "SystemError: the end" in crash["exception"]
