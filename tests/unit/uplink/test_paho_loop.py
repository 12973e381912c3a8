"""The socket plumbing under paho: a deliberate close ends the connection cleanly.

Real TCP sockets on loopback stand in for agent and broker: the byte-level behaviour under test
(a close with unread bytes is a reset that drops unsent data) belongs to the kernel, not to us.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from edge_agent.uplink.paho_loop import settle_before_close

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")


@pytest.fixture
def link() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(agent, broker): a connected pair of TCP sockets on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        agent = socket.create_connection(server.getsockname())
        broker, _ = server.accept()
    yield agent, broker
    agent.close()
    broker.close()


def broker_reads_to_the_end(broker: socket.socket) -> bytes:
    """Everything the broker receives until the agent's end of the stream; raises on a reset."""
    broker.settimeout(10)
    data = b""
    while chunk := broker.recv(65536):
        data += chunk
    return data


def test_a_disconnect_written_corked_reaches_the_broker_though_a_puback_is_unread(
    link: tuple[socket.socket, socket.socket],
) -> None:
    agent, broker = link
    broker.sendall(b"\x40\x02\x00\x01")  # a PUBACK the agent will not read: it is leaving
    assert select.select([agent], [], [], 10)[0], "the PUBACK did not arrive"
    agent.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)  # as paho's corked flush leaves it
    agent.sendall(b"\xe0\x00")  # DISCONNECT, held back by the cork
    settle_before_close(agent)  # what PahoLoop does when paho tells it the socket closes
    agent.close()
    # Without settling, the close is a reset: the DISCONNECT never leaves, the broker gets
    # ECONNRESET and publishes the last will.
    assert broker_reads_to_the_end(broker) == b"\xe0\x00"
