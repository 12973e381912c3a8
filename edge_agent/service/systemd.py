"""systemd's notify protocol without a dependency: one datagram per message to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("systemd")


def notify(*fields: str) -> bool:
    """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``... to systemd; False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":  # unset, or a kind we do not speak (vsock:)
        return False
    if address[0] == "@":  # an abstract socket: its name starts with a NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a stalled systemd must never stall the event loop
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as err:
        log.warning("systemd notification not sent", socket=address, error=str(err))
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when none are wanted."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
