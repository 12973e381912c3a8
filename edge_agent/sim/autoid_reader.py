"""An industrial RFID reader behind OPC UA, for the tests and the bench: the parts of OPC 30010 we use.

An asyncua server with, in the AutoID namespace, an object ``RfidReader`` holding

    LastScanData   ByteString   identifier of the tag in the field, empty when there is none
    events         AutoIdScanEventType { DeviceName, ScanResult: RfidScanResult }, one per scan
    ReadTag(Identifier, CodeType, Region, Offset, Length, Password) -> (ResultData, Status)
    WriteTag(Identifier, CodeType, Region, Offset, Data, Password) -> Status

with Status an AutoIdOperationStatusEnumeration value. It is an equivalent of those parts of
RfidReaderDeviceType, not the full information model. Each scan fires an ``AutoIdScanEventType``
event from the RfidReader object carrying ``DeviceName`` and ``ScanResult``, an ``RfidScanResult``
structure (CodeType, ScanData, Timestamp) defined in the server's type dictionary, and LastScanData
changes too. Simplified: ScanData is a ByteString field where the specification has the ScanData
union (ByteString / String / ScanDataEpc / Custom), RfidScanResult has no Location and no Sighting
list, and the methods' Identifier is the UID as a ByteString. Tags hold their memory per region;
region 3 (USER) is the one the agent uses.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from asyncua import Server, ua
from asyncua.common.methods import uamethod
from asyncua.common.structures104 import new_struct, new_struct_field

from ..messages import uid_hex

NAMESPACE = "http://opcfoundation.org/UA/AutoID/"
USER_REGION = 3
SUCCESS, NO_IDENTIFIER, OUT_OF_RANGE_ERROR, REGION_NOT_FOUND_ERROR = 0, 8, 7, 5


@dataclass
class SimulatedRfidTag:
    uid: bytes
    user: bytearray  # region 3


@dataclass
class AutoIdReaderSim:
    """``await start()`` -> the endpoint URL; ``await present(tag)`` / ``await remove()``."""

    tag: SimulatedRfidTag | None = None
    fail_next_read: int | None = None  # tests: the next ReadTag answers this status
    fail_next_write: int | None = None
    writes: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) per WriteTag
    url: str = ""
    _server: Any = None
    _last_scan: Any = None
    _scan_events: Any = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        server = Server()
        await server.init()
        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.url = f"opc.tcp://{host}:{port}/autoid"
        server.set_endpoint(self.url)
        server.set_server_name("edge-agent simulated RFID reader")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NAMESPACE)
        # OPC 30010's scan event: AutoIdScanEventType with a ScanResult (RfidScanResult) structure.
        result_type, _ = await new_struct(
            server,
            idx,
            "RfidScanResult",
            [
                new_struct_field("CodeType", ua.VariantType.String),
                new_struct_field("ScanData", ua.VariantType.ByteString),
                new_struct_field("Timestamp", ua.VariantType.DateTime),
            ],
        )
        await server.load_data_type_definitions()
        event_type = await server.create_custom_event_type(
            idx,
            "AutoIdScanEventType",
            ua.ObjectIds.BaseEventType,
            [
                ("DeviceName", ua.VariantType.String),
                ("ScanResult", ua.VariantType.ExtensionObject, result_type.nodeid),
            ],
        )
        reader = await server.nodes.objects.add_object(idx, "RfidReader")
        self._scan_events = await server.get_event_generator(event_type, reader)
        self._last_scan = await reader.add_variable(
            idx, "LastScanData", ua.Variant(b"", ua.VariantType.ByteString)
        )
        bstr, text = ua.VariantType.ByteString, ua.VariantType.String
        u16, u32, i32 = ua.VariantType.UInt16, ua.VariantType.UInt32, ua.VariantType.Int32
        head = [_arg("Identifier", bstr), _arg("CodeType", text), _arg("Region", u16)]
        await reader.add_method(
            idx,
            "ReadTag",
            uamethod(self._read_tag),
            [*head, _arg("Offset", u32), _arg("Length", u32), _arg("Password", bstr)],
            [_arg("ResultData", bstr), _arg("Status", i32)],
        )
        await reader.add_method(
            idx,
            "WriteTag",
            uamethod(self._write_tag),
            [*head, _arg("Offset", u32), _arg("Data", bstr), _arg("Password", bstr)],
            [_arg("Status", i32)],
        )
        await server.start()
        self._server = server
        return self.url

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()

    async def present(self, tag: SimulatedRfidTag, *, last_scan_data: bool = True) -> None:
        """A tag enters the field: LastScanData changes, then an AutoIdScanEvent is fired.

        ``last_scan_data=False``: the event only, as from a reader that does not keep LastScanData.
        """
        self.tag = tag
        if last_scan_data:
            await self._last_scan.write_value(ua.Variant(tag.uid, ua.VariantType.ByteString))
        event = self._scan_events.event
        event.DeviceName = "RfidReader"
        # ua.RfidScanResult is generated from the type dictionary at start()
        event.ScanResult = ua.RfidScanResult(
            CodeType="RAW:BYTES", ScanData=tag.uid, Timestamp=datetime.now(UTC)
        )
        event.Message = ua.LocalizedText(f"scan {uid_hex(tag.uid)}")
        await self._scan_events.trigger()

    async def remove(self) -> None:
        self.tag = None
        await self._last_scan.write_value(ua.Variant(b"", ua.VariantType.ByteString))

    # ------------------------------------------------------------------ methods

    def _target(self, identifier: bytes, region: int) -> tuple[SimulatedRfidTag | None, int]:
        if self.tag is None or bytes(identifier) != self.tag.uid:
            return None, NO_IDENTIFIER
        if region != USER_REGION:
            return None, REGION_NOT_FOUND_ERROR
        return self.tag, SUCCESS

    def _read_tag(
        self, parent: Any, identifier: bytes, code_type: str, region: int, offset: int,
        length: int, password: bytes,
    ) -> tuple[ua.Variant, ua.Variant]:  # fmt: skip
        tag, status = self._target(identifier, region)
        if tag is not None and self.fail_next_read is not None:
            status, self.fail_next_read = self.fail_next_read, None
        elif tag is not None and offset + length > len(tag.user):
            status = OUT_OF_RANGE_ERROR
        data = bytes(tag.user[offset : offset + length]) if tag and status == SUCCESS else b""
        return (
            ua.Variant(data, ua.VariantType.ByteString),
            ua.Variant(status, ua.VariantType.Int32),
        )

    def _write_tag(
        self, parent: Any, identifier: bytes, code_type: str, region: int, offset: int,
        data: bytes, password: bytes,
    ) -> ua.Variant:  # fmt: skip
        tag, status = self._target(identifier, region)
        if tag is not None and self.fail_next_write is not None:
            status, self.fail_next_write = self.fail_next_write, None
        elif tag is not None and offset + len(data) > len(tag.user):
            status = OUT_OF_RANGE_ERROR
        if tag is not None and status == SUCCESS:
            tag.user[offset : offset + len(data)] = data
            self.writes.append((offset, len(data)))
        return ua.Variant(status, ua.VariantType.Int32)


def _arg(name: str, vtype: ua.VariantType) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(vtype.value)
    arg.ValueRank = -1
    arg.Description = ua.LocalizedText(name)
    return arg
