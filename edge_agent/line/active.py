"""The station in use: one config's profile, machine driver, cycle, adjustments and telemetry.

Built whole from a config (the driver created, nothing started), then swapped whole between
cycles on reload, push or rollback: the new station takes over from the old one, which stops.
What lives longer than a profile (the reader, the uplink, the task supervisor) comes in as
``StationWiring``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..config import AgentConfig
from ..errors import PartRejected, Reason, TagIOError
from ..instructions.signing import KeyRing
from ..machine import registry
from ..machine.driver import MachineDriver
from ..machine.profile import Profile
from ..messages import uid_hex
from ..station.cycle import StationCycle, WriteAhead
from ..station.report import CycleReport
from ..supervisor import Spawn
from ..tag.reader import ScanEvent, TagReader
from .adjustments import Adjustments
from .telemetry import Telemetry

log = structlog.get_logger("agent")

#: (topic suffix, payload, qos): the agent's way out to the line
Publish = Callable[[str, dict[str, Any], int], object]


@dataclass(frozen=True)
class StationWiring:
    """What every station built here shares, across swaps."""

    reader: TagReader
    publish: Publish
    #: A final cycle report, to every output.
    report: Callable[[CycleReport], object]
    write_ahead: WriteAhead
    spawn: Spawn


@dataclass(eq=False)
class ActiveStation:
    config: AgentConfig
    driver: MachineDriver
    keyring: KeyRing
    cycle: StationCycle
    adjustments: Adjustments
    telemetry: Telemetry

    @property
    def profile(self) -> Profile:
        return self.config.profile

    @classmethod
    def build(
        cls,
        config: AgentConfig,
        wiring: StationWiring,
        *,
        driver: MachineDriver | None = None,
        keyring: KeyRing | None = None,
    ) -> ActiveStation:
        """The station ``config`` describes; ``driver`` and ``keyring``: the running ones, kept."""
        profile = config.profile
        if driver is None:
            driver = registry.driver_module(profile.driver).create(config.machine, profile)
        if keyring is None:
            keyring = KeyRing.from_files({k: str(p) for k, p in config.trusted_keys.items()})
        publish = wiring.publish
        adjustments = Adjustments(config.gateway_id, profile, driver, publish=publish)
        cycle = StationCycle(
            gateway_id=config.gateway_id,
            station=config.station,
            profile=profile,
            driver=driver,
            keyring=keyring,
            reader=wiring.reader,
            publish=wiring.report,
            write_back=config.cycle.write_back,
            adjust=adjustments.apply if config.commands.adjustments else None,
            state_dir=config.state_dir,
            write_ahead=wiring.write_ahead,
        )
        telemetry = Telemetry(
            gateway_id=config.gateway_id,
            profile=profile,
            enabled=config.telemetry.enabled,
            driver=driver,
            publish=publish,
            spawn=wiring.spawn,
        )
        return cls(config, driver, keyring, cycle, adjustments, telemetry)

    async def take_over(self, old: ActiveStation) -> None:
        """Between cycles (the machine lock held): stop ``old`` and go on where it left off."""
        await old.telemetry.stop()
        if old.driver is not self.driver:
            await old.driver.close()
        self.cycle.take_over(old.cycle)
        self.adjustments.take_over(old.adjustments)
        self.telemetry.start()

    async def refusal(self, event: ScanEvent, reason: Reason, error: str) -> CycleReport:
        """The report for a part turned away (``reason``, ``error``) without touching the machine."""
        config = self.config
        report = CycleReport(config.gateway_id, config.station, uid_hex(event.uid))
        report.reason, report.error = reason, error
        report.profile = self.profile.describe()
        # Which part was turned away: the tag is read and verified; the machine is not touched.
        try:
            report.part, report.key_id = await self.cycle.identify(event.uid)
        except (TagIOError, PartRejected) as err:
            report.error += f"; the part is not known: {err}"
        log.warning("part refused", tag=report.tag_uid, reason=reason, error=report.error)
        return report
