"""Structured logs: JSON lines under systemd, Docker or a pipe; readable lines on a terminal.

Our own events go through structlog. Libraries (asyncua, pymodbus, nfcpy, asyncio itself) log
through the standard library: their records are rendered by the same processors, so in JSON mode
every line on stderr is one JSON object, tracebacks included (in the ``exception`` field).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from types import TracebackType
from typing import Literal

import structlog

Format = Literal["auto", "json", "console"]

_HANDLER_NAME = "edge-agent"  # our handler on the root logger, replaced by each setup


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
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Library records: the same fields and renderer as ours, plus the logger's name.
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # The console renderer prints a traceback itself; JSON wants it as a field.
                *([structlog.processors.format_exc_info] if fmt == "json" else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME or fmt == "json"]:
        root.removeHandler(old)  # in JSON mode nothing else may write plain text to stderr
    root.addHandler(handler)
    root.setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
    logging.captureWarnings(True)  # warnings.warn() too, as records of logger py.warnings
    # Their errors reach us as exceptions we translate; their own INFO chatter is noise at 3 a.m.
    for name, normal in (
        ("pymodbus", logging.CRITICAL),
        ("asyncua", logging.WARNING),
        ("nfc", logging.WARNING),
    ):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else normal)
    if fmt == "json":
        # A crash outside any logger (an uncaught exception, in the main thread or another)
        # is one JSON line too, not a bare traceback in the middle of the stream.
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught


_crash = structlog.get_logger("edge_agent")


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    _crash.critical("uncaught exception: the process ends", exc_info=(kind, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    _crash.critical(
        "uncaught exception in a thread: the thread ends",
        thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
