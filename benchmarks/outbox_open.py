"""What the disk outbox's integrity check at open and a salvage cost on a full outbox.

    python benchmarks/outbox_open.py [--messages 100000] [--size 1000]

Fills an outbox file with ``--messages`` cycle-report-sized payloads (``--size`` bytes of JSON;
100 000 is the default ``outbox.max_messages``), then prints the file size, the time of
``PRAGMA quick_check`` (with the page cache dropped first when run as root, then warm), the time
of a whole open (the check, the counts, the sequence), and the time to salvage every row into a
fresh file as a damaged outbox is at open.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_agent.uplink import outbox_salvage as salvage  # noqa: E402
from edge_agent.uplink.outbox_sqlite import SqliteOutbox  # noqa: E402


def fill(path: Path, messages: int, size: int) -> None:
    SqliteOutbox(path).close()  # the outbox's own schema
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for n in range(messages):
        body = json.dumps({"schema": "edge-agent/cycle/1", "n": n, "text": "r" * size}).encode()
        db.execute(
            "INSERT INTO messages (id, topic, payload, qos, retain, keep, created)"
            " VALUES (?, ?, ?, 1, 0, 2, ?)",
            (n + 1, "edge/gw/cycles", body, time.time()),
        )
    db.execute("COMMIT")
    db.close()


def drop_caches() -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "page cache dropped"
    except OSError:
        return "page cache not dropped (not root)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.sqlite3"
        fill(path, args.messages, args.size)
        print(f"{args.messages} messages, file {path.stat().st_size / 2**20:.1f} MiB")
        print(f"load average {os.getloadavg()[0]:.1f}; {drop_caches()}")
        for label in ("cold", "warm", "warm"):
            db = sqlite3.connect(path, isolation_level=None)
            started = time.perf_counter()
            damage = salvage.integrity(db)
            checked = time.perf_counter() - started
            db.close()
            started = time.perf_counter()
            SqliteOutbox(path).close()
            opened = time.perf_counter() - started
            print(f"{label}: quick_check {checked:.3f} s ({damage or 'ok'}), open {opened:.3f} s")
        copy = Path(tmp) / "copy.sqlite3"
        SqliteOutbox(copy).close()
        src, dst = sqlite3.connect(path), sqlite3.connect(copy, isolation_level=None)
        started = time.perf_counter()
        copied = salvage.copy_rows(src, dst)
        print(f"salvage: {copied.messages} rows copied in {time.perf_counter() - started:.2f} s")
        src.close()
        dst.close()


if __name__ == "__main__":
    main()
