"""The one reconnect supervisor: backoff, states, log lines, attempts on demand.

The session is a fake connect coroutine: it is the lowest layer here, everything above it (the
backoff, the state, the log lines) is the real ``Link``. Each link's tests against real peers
(mosquitto, the PLC and OPC UA simulators, nfcpy over udp) check the same behaviour end to end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import structlog.testing

from edge_agent.errors import MachineError
from edge_agent.link import Backoff, Link, LinkDown, LinkState, LinkWaiting


def test_doubles_up_to_the_cap_with_jitter() -> None:
    b = Backoff(0.1, 2.0)
    delays = [b.failed("refused") for _ in range(8)]
    for n, delay in enumerate(delays):
        nominal = min(2.0, 0.1 * 2**n)
        assert 0.8 * nominal <= delay <= min(2.0, 1.2 * nominal)
    assert max(delays) <= 2.0 and b.failures == 8 and b.last_error == "refused"
    assert 0 < b.remaining() <= 2.0


def test_one_step_per_round_of_a_list() -> None:
    b = Backoff(1.0, 60.0, per_round=2)  # two brokers: each pair of failures is one step
    delays = [b.failed("down") for _ in range(4)]
    assert all(0.8 <= d <= 1.2 for d in delays[:2]) and all(1.6 <= d <= 2.4 for d in delays[2:])


def test_jitter_spreads_a_fleet() -> None:
    delays = {round(Backoff(1.0, 60.0).failed("x"), 6) for _ in range(50)}
    assert len(delays) > 40  # fifty gateways do not retry in the same instant


def test_refusal_waits_longest_and_success_resets() -> None:
    b = Backoff(0.1, 30.0)
    assert b.failed("wrong password", longest=True) >= 24.0
    assert b.succeeded() == 1
    assert b.failures == 0 and b.remaining() == 0.0


def test_waiting_says_why_and_for_how_long() -> None:
    b = Backoff(5.0, 10.0)
    assert b.waiting() is None
    b.failed("Connection refused")
    message = b.waiting()
    assert message is not None and message.startswith("unreachable, next attempt in ")
    assert message.endswith("s (last error: Connection refused)")
    b.succeeded()
    assert b.waiting() is None


class Peer:
    """A fake device: connecting succeeds only while it is ``up``; ``drop()`` ends the session."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.up = False
        self.refuse = False
        self.attempts = 0
        self.dropped = asyncio.Event()

    async def connect(self) -> dict[str, Any] | None:
        self.attempts += 1
        if self.refuse:
            raise LinkDown("wrong password", refused=True)
        if not self.up:
            raise MachineError("connection refused", device=self.link.device)
        return {"ms": 1.0}

    async def session(self) -> None:
        await self.connect()
        self.link.up()
        self.dropped.clear()
        await self.dropped.wait()


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def lines(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [(e["log_level"], e["event"]) for e in logs]


async def test_outage_is_one_warning_debug_while_it_lasts_and_one_recovered() -> None:
    link = Link("machine", "plc 10.0.0.5", 0.01, 0.04)
    peer = Peer(link)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(link.run(peer.session))
        await until(lambda: peer.attempts >= 5)
        assert link.state is LinkState.WAITING
        peer.up = True

        def connected() -> bool:  # a lambda would keep the narrowing of the assert above
            return link.state is LinkState.CONNECTED

        await until(connected)
        link.stop()
        peer.dropped.set()
        await task
    seen = lines(logs)
    unreachable = [level for level, event in seen if event == "machine unreachable"]
    assert unreachable[0] == "warning" and set(unreachable[1:]) == {"debug"}
    [recovered] = [e for e in logs if e["event"] == "machine link recovered"]
    assert recovered["log_level"] == "info" and recovered["device"] == "plc 10.0.0.5"
    assert recovered["outage_s"] > 0 and recovered["attempts"] == peer.attempts
    # The device is a field, named once; the reason is the message without it.
    first = next(e for e in logs if e["event"] == "machine unreachable")
    assert first["reason"] == "connection refused" and first["device"] == "plc 10.0.0.5"
    assert link.sessions == 1


async def test_a_lost_link_is_one_warning_and_retried_at_once() -> None:
    link = Link("broker", "mqtt://a:1883", 5.0, 30.0)  # a long backoff that must not apply
    peer = Peer(link)
    peer.up = True
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(link.run(peer.session))
        await until(lambda: link.state is LinkState.CONNECTED)
        link._up = (time.monotonic() - 10, 0)  # it has been up a while
        peer.dropped.set()
        await until(lambda: link.sessions == 2)
        link.stop()
        peer.dropped.set()
        await task
    assert lines(logs) == [
        ("info", "broker connected"),
        ("warning", "broker link lost"),
        ("info", "broker link recovered"),
    ]
    assert link.state is LinkState.STOPPED


async def test_a_link_that_drops_as_soon_as_it_is_up_backs_off() -> None:
    link = Link("nfc reader", "usb", 0.05, 0.2)
    peer = Peer(link)
    peer.up = True

    async def flapping() -> None:
        await peer.connect()
        link.up()
        raise RuntimeError("bug in the session")

    task = asyncio.create_task(link.run(flapping))
    await asyncio.sleep(0.5)
    link.stop()
    await task
    assert 3 <= peer.attempts <= 12  # paced by the backoff, not a busy loop
    assert link.last_error == "bug in the session"


async def test_a_refusal_waits_the_longest_and_attempt_now_cuts_it_short() -> None:
    link = Link("machine", "opcua opc.tcp://m:4840", 0.01, 60.0)
    peer = Peer(link)
    peer.refuse = True
    task = asyncio.create_task(link.run(peer.session))
    await until(lambda: peer.attempts == 1)
    await asyncio.sleep(0.1)
    assert peer.attempts == 1 and link.refused and link.remaining() > 40
    assert link.waiting() is not None and "wrong password" in link.waiting()  # type: ignore[operator]
    peer.refuse, peer.up = False, True  # fixed; someone needs the link now
    link.attempt_now()
    await until(lambda: link.state is LinkState.CONNECTED)
    assert peer.attempts == 2
    link.stop()
    peer.dropped.set()
    await task


async def test_attempt_on_demand_fails_fast_while_waiting() -> None:
    link = Link("machine", "modbus 10.0.0.5:502 unit 1", 10.0, 30.0)
    peer = Peer(link)
    with pytest.raises(MachineError, match="connection refused"):
        await link.attempt(peer.connect)
    with pytest.raises(
        LinkWaiting,
        match=r"^unreachable, next attempt in [\d.]+ s \(last error: connection refused\)$",
    ):
        await link.attempt(peer.connect)
    assert peer.attempts == 1  # the second call did not knock
    peer.up = True
    link.attempt_now()  # a part is waiting: whatever the backoff says
    with structlog.testing.capture_logs() as logs:
        await link.attempt(peer.connect)
    assert link.state is LinkState.CONNECTED and link.sessions == 1
    assert logs[0]["event"] == "machine link recovered" and logs[0]["ms"] == 1.0


def test_blocking_run_stops_when_told() -> None:
    link = Link("nfc reader", "usb", 0.01, 0.02)
    stop = threading.Event()
    attempts = []

    def session() -> None:
        attempts.append(1)
        if len(attempts) >= 3:
            stop.set()
        raise OSError(19, "No such device")

    link.run_blocking(session, stop)
    assert len(attempts) == 3 and link.state is LinkState.STOPPED
    assert link.last_error == "[Errno 19] No such device"


async def test_stop_ends_a_pause_at_once() -> None:
    link = Link("autoid reader", "opc.tcp://reader:4840", 30.0, 60.0)
    peer = Peer(link)
    task = asyncio.create_task(link.run(peer.session))
    await until(lambda: peer.attempts == 1)
    link.stop()  # 24..36 s of backoff left
    await asyncio.wait_for(task, 1)
    assert peer.attempts == 1 and link.state is LinkState.STOPPED
