"""Backoff: doubling from the minimum, capped, jittered, reset on success."""

from __future__ import annotations

from edge_agent.backoff import Backoff


def test_doubles_up_to_the_cap_with_jitter() -> None:
    b = Backoff(0.1, 2.0)
    delays = [b.failed("refused") for _ in range(8)]
    for n, delay in enumerate(delays):
        nominal = min(2.0, 0.1 * 2**n)
        assert 0.8 * nominal <= delay <= min(2.0, 1.2 * nominal)
    assert max(delays) <= 2.0 and b.failures == 8 and b.last_error == "refused"
    assert 0 < b.remaining() <= 2.0


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
