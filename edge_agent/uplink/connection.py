"""The connection to the broker, supervised by ``link.Link`` like every other link.

Capped exponential backoff with jitter (a plant's gateways must not all reconnect in the same
second after a broker restart), each round of the broker list one step, one WARNING when the link
goes down, DEBUG while it stays down, one INFO when it recovers.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..config_schema import BrokerConfig
from ..link import Link, LinkDown

log = structlog.get_logger("uplink")

#: The last will for the next connection: (topic, payload, qos, retain).
WillFn = Callable[[], tuple[str, bytes, int, bool]]

#: CONNACK reasons that another attempt with the same settings cannot fix: wait longest.
_AUTH_REFUSED = {
    "Not authorized",
    "Bad user name or password",
    "Banned",
    "Client identifier not valid",
}


class Connection:
    """Connect, fail over, hold the connection: mixed into ``MqttUplink``, sharing its state."""

    _client: mqtt.Client
    _broker: BrokerConfig
    _v5: bool
    _endpoints: list[tuple[str, int]]
    _endpoint: int
    _link: Link
    _loop: asyncio.AbstractEventLoop | None
    _connected: asyncio.Event
    _connack: asyncio.Future[ReasonCode] | None
    _connecting: bool
    _lost: asyncio.Event
    _last_error: str | None
    _will: WillFn | None

    def next_server(self) -> None:
        """Leave this broker with a clean DISCONNECT (no last will) and connect to the next of the
        list, as after a lost connection; with one broker, to the same one again."""
        self._endpoint = (self._endpoint + 1) % len(self._endpoints)
        # Called from a message handler: paho acknowledges that message after the handler
        # returns, so the DISCONNECT waits its turn; else the broker would redeliver the command
        # on the next session and it would act again.
        asyncio.get_running_loop().call_soon(self._leave)

    def _leave(self) -> None:
        if self._connected.is_set():
            self._client.disconnect()

    async def _supervise(self) -> None:
        await self._link.run(self._session)

    async def _session(self) -> None:
        """Connect to the next broker of the list and hold the connection until it is lost."""
        self._link.device = self._address
        failed = await self._connect_once()
        if failed is not None:
            # Failover: the next broker in the list; the backoff grows with each round of it.
            self._endpoint = (self._endpoint + 1) % len(self._endpoints)
            reason, refused = failed
            raise LinkDown(reason, refused=refused)
        self._link.up()
        self._lost.clear()
        await self._lost.wait()

    @property
    def _address(self) -> str:
        host, port = self._endpoints[self._endpoint]
        return f"{'mqtts' if self._broker.use_tls else 'mqtt'}://{host}:{port}"

    async def _connect_once(self) -> tuple[str, bool] | None:
        """Connect and wait for CONNACK. None on success, else (reason in words, login refused)."""
        assert self._loop is not None
        self._connack = self._loop.create_future()
        self._last_error = None
        self._client.on_log = self._on_log  # until CONNACK only: paho formats every log line
        host, port = self._endpoints[self._endpoint]
        kwargs: dict[str, Any] = {}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = (
                0 if self._broker.clean_session else self._broker.session_expiry
            )
            kwargs = {"clean_start": self._broker.clean_session, "properties": props}
        if self._will is not None:
            self._client.will_set(*self._will())
        self._connecting = True  # keeps loop_misc() off the client while the thread connects
        try:
            await asyncio.to_thread(
                self._client.connect, host, port, self._broker.keepalive, **kwargs
            )
        except ssl.SSLCertVerificationError as err:
            return f"TLS: broker certificate rejected: {err.verify_message}", False
        except ssl.SSLError as err:
            return f"TLS: {err.reason or err}", False
        except (OSError, socket.gaierror) as err:
            return err.strerror or str(err) or type(err).__name__, False
        finally:
            self._connecting = False
        try:
            code = await asyncio.wait_for(self._connack, timeout=10)
        except ConnectionError as err:
            return str(err), False
        except TimeoutError:
            self._client.disconnect()
            return "no CONNACK within 10 s", False
        if code.is_failure:
            self._client.disconnect()
            return f"broker refused the connection: {code}", str(code) in _AUTH_REFUSED
        return None

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, props: Any
    ) -> None:
        self._connected.clear()
        self._lost.set()
        if self._connack is not None and not self._connack.done():
            # Closed before CONNACK: the supervisor retries now instead of waiting out its timeout.
            self._connack.set_exception(
                ConnectionError(f"connection closed before CONNACK ({self._last_error or code})")
            )

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        # The reason a TLS peer hung up (e.g. "certificate required") reaches us only as a log.
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = buf
