"""paho-mqtt driven from the asyncio event loop, not from paho's own thread.

paho tells us which socket to watch (socket callbacks → ``add_reader``/``add_writer``) and a task
runs ``loop_misc`` for keepalive pings, so callbacks run on the loop and touch the uplink's state
without locks. Only the blocking TCP connect runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import paho.mqtt.client as mqtt
import structlog

log = structlog.get_logger("uplink")

_F = TypeVar("_F", bound=Callable[..., None])


def guarded(callback: _F) -> _F:
    """Nothing raises into paho: its loop would drop the connection, or worse, stop reading."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback failed", callback=callback.__name__)

    return cast(_F, run)


#: Seconds between two writes to the broker while messages keep coming (see _flush_soon).
FLUSH_INTERVAL = 0.005


def _cork(sock: Any, on: bool) -> bool:
    """TCP_CORK (Linux): hold back partial segments until uncorked. False where unsupported."""
    option = getattr(socket, "TCP_CORK", None)
    if option is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, int(on))
    except (OSError, AttributeError):
        return False
    return True


def settle_before_close(sock: Any) -> None:
    """Make a close of ``sock`` a clean end: uncorked, what was written leaves now, and what the
    broker sent that no one will read is read away. A close with unread bytes is a TCP reset,
    which drops what is still unsent (a DISCONNECT), and a broker that sees the reset takes the
    connection as lost and publishes the last will."""
    _cork(sock, False)
    with contextlib.suppress(OSError, ValueError):  # ssl.SSLWantReadError is an OSError
        sock.setblocking(False)
        for _ in range(64):  # bounded: a broker still sending is cut off after 4 MiB
            if not sock.recv(65536):
                return


class PahoLoop:
    """The socket plumbing of ``MqttUplink``: mixed into it, sharing its paho client."""

    _client: mqtt.Client
    _connecting: bool  # True while connect() runs in its thread: loop_misc() keeps off

    def _bridge(self) -> None:
        self._client.on_socket_open = self._on_socket_open
        self._client.on_socket_close = self._on_socket_close
        self._client.on_socket_register_write = self._on_socket_register_write
        self._client.on_socket_unregister_write = self._on_socket_unregister_write

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._flush_timer: asyncio.Handle | None = None
        self._flushed_at = float("-inf")  # loop time of the last write

    async def _misc(self) -> None:
        # paho's keepalive pings and timeouts
        while True:
            await asyncio.sleep(1)
            if self._client.socket() is not None and not self._connecting:
                self._client.loop_misc()

    # Socket plumbing: paho tells us which socket to watch. connect() runs in a worker thread, so
    # registration is handed to the loop; a socket closed before that runs is skipped.
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Small messages must not wait for Nagle + delayed ACK (~40 ms per command reply).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in_loop(lambda: self._watch(sock, self._read, write=False))

    def _read(self) -> None:
        self._client.loop_read()
        # TLS: records already decrypted wait inside the SSL object, where the selector cannot
        # see them; read them now or PUBACKs stall until the next byte arrives.
        for _ in range(1000):
            sock = self._client.socket()
            if sock is None or not getattr(sock, "pending", lambda: 0)():
                break
            self._client.loop_read()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho closes the socket right after, often from inside a corked write (its DISCONNECT):
        # uncorked now, what was written leaves before the close. A close with unread bytes
        # (a PUBACK just in) is a reset that discards the unsent rest, and a broker that never
        # sees the DISCONNECT publishes the last will.
        settle_before_close(sock)
        self._unwatch(sock)  # unregister now, not later

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._flush_soon)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(lambda: self._unwatch(sock, read=False))

    # Writing. paho sends each packet with its own send(), and on loopback or a LAN every send is
    # a segment that wakes the broker: under a flood of commands a PUBACK and a reply each, at
    # about as much CPU as the rest of the command. So what paho queues goes out at most once per
    # FLUSH_INTERVAL, corked into as few segments as fit; on an idle link at once. The write
    # waits for the selector, so a read ready at the same time goes first (it may carry the
    # reason the broker is closing the connection, which a write into that closing would lose).
    def _flush_soon(self) -> None:
        if self._flush_timer is not None:
            return  # a flush is already due
        assert self._loop is not None
        wait = self._flushed_at + FLUSH_INTERVAL - self._loop.time()
        if wait <= 0:
            self._want_write()
        else:
            self._flush_timer = self._loop.call_later(wait, self._want_write)

    def _want_write(self) -> None:
        self._flush_timer = None
        sock = self._client.socket()
        if sock is not None:
            self._watch(sock, self._flush, write=True)

    def _flush(self) -> None:
        assert self._loop is not None
        self._flushed_at = self._loop.time()
        sock = self._client.socket()
        corked = sock is not None and _cork(sock, True)
        try:
            self._client.loop_write()  # all written: paho unregisters, the writer is removed
        finally:
            if corked:
                _cork(sock, False)

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is None or self._loop.is_closed():
            return  # paho's __del__ after the loop is gone: nothing left to watch
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _watch(self, sock: Any, callback: Callable[[], Any], *, write: bool) -> None:
        assert self._loop is not None
        if sock.fileno() == -1:
            return
        if write:
            self._loop.add_writer(sock, callback)
        else:
            self._loop.add_reader(sock, callback)

    def _unwatch(self, sock: Any, *, read: bool = True) -> None:
        assert self._loop is not None
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if read and self._client.socket() is sock and self._client.want_write():
            self._flush()  # leaving the socket (stop): what waits, a DISCONNECT, goes now
        with contextlib.suppress(ValueError, KeyError, OSError):
            if read:
                self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
