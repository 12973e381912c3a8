"""Structured logs: JSON lines under systemd, Docker or a pipe; readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog

Format = Literal["auto", "json", "console"]


def setup_logging(level: str = "info", fmt: Format = "auto") -> None:
    if fmt == "auto":
        # systemd sets JOURNAL_STREAM / INVOCATION_ID; a pipe or a container log is not a TTY.
        under_service = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
        fmt = "json" if under_service or not sys.stderr.isatty() else "console"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Library loggers (pymodbus, asyncua) go through the stdlib: keep them quiet unless debugging.
    logging.basicConfig(
        level=logging.WARNING if level != "debug" else logging.DEBUG, stream=sys.stderr
    )
    # Their errors reach us as exceptions we translate; their own INFO chatter is noise at 3 a.m.
    for name, normal in (
        ("pymodbus", logging.CRITICAL),
        ("asyncua", logging.WARNING),
        ("nfc", logging.WARNING),
    ):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else normal)
