"""What the line may do to the station: pause it, ask its state, give it another profile.

``LineControl`` implements line/commands.py's ``StationControl``. It holds the active station
(line/active.py) and the machine lock a cycle holds for its whole run; a reload, push or rollback
builds the next station whole (validated, its driver created) before the lock is taken, so a
refused one leaves the station running as it was, and swaps it in between cycles.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import structlog

from .. import messages
from ..config import NEEDS_RESTART, AgentConfig, load_config, profile_for, profile_keyring
from ..errors import ConfigError, ConfigProblem
from ..machine.driver import MachineDriver
from ..machine.profile import Profile
from ..machine.profile_diff import envelope_changes
from ..machine.profile_signature import ProfileRefused, is_newer, verify_profile
from .active import ActiveStation, Publish, StationWiring
from .intake import load_pushed_profile

log = structlog.get_logger("agent")

#: Accepted profiles remembered for pushed rollbacks; a profile is a few KiB.
_ACCEPTED_KEPT = 8


class LineControl:
    def __init__(
        self,
        active: ActiveStation,
        wiring: StationWiring,
        *,
        status: Callable[[], dict[str, Any]],
        backlog: Callable[[], int],
        on_reload: Callable[[AgentConfig], None],
    ) -> None:
        self.active = active
        self._wiring = wiring
        self._status, self._backlog, self._on_reload = status, backlog, on_reload
        # Held by a cycle for its whole run: commands write and swaps happen only between cycles.
        self.machine_lock = asyncio.Lock()
        self.paused = False  # by the line: arriving parts are refused, the machine is left alone
        self._previous_profile: Profile | None = None  # before the last push: for rollback
        # Profiles that were active here (by content hash): a pushed rollback may return to them.
        profile = active.profile
        self._accepted: dict[str, Profile] = {profile.content_hash: profile}
        self.adjustment_sets = ActiveAdjustments(self)
        if profile.signature is None:
            log.warning(
                "firmware profile is not signed; set machine.require_signed_profile to refuse it",
                profile=profile.name,
                file=profile.source,
            )

    @property
    def profile(self) -> Profile:
        return self.active.profile

    @property
    def driver(self) -> MachineDriver:
        return self.active.driver

    @property
    def _publish(self) -> Publish:
        return self._wiring.publish

    def line_status(self) -> dict[str, Any]:
        return {
            **self._status(),
            "paused": self.paused,
            "cycle_running": self.machine_lock.locked(),
            "machine_connected": self.active.driver.connected,
            "telemetry": self.active.telemetry.status(),
            "adjustments": self.active.adjustments.state(),
            "backlog": self._backlog(),
        }

    def pause(self) -> dict[str, Any]:
        running = self.machine_lock.locked()
        if not self.paused:
            log.warning("paused by the line: no new parts", cycle_running=running)
        self.paused = True
        return {"paused": True, "cycle_running": running}

    def resume(self) -> dict[str, Any]:
        if self.paused:
            log.info("resumed by the line")
        self.paused = False
        return {"paused": False}

    async def reload(self) -> dict[str, Any]:
        """Read the config and its profile again; swap them in between cycles.

        Everything is validated (and the new driver created) before anything changes, so an invalid
        file leaves the station running as it was. Identity and broker changes need a restart.
        """
        old = self.active.config
        new = load_config(old.source)
        restart = [k for k in NEEDS_RESTART if getattr(new, k) != getattr(old, k)]
        machine_changed = (
            new.profile.content_hash != old.profile.content_hash or new.machine != old.machine
        )
        # What needs a restart keeps its running value, so status stays true.
        config = dataclasses.replace(new, **{k: getattr(old, k) for k in restart})
        station = ActiveStation.build(
            config, self._wiring, driver=None if machine_changed else self.active.driver
        )
        await self._swap(station, reloaded=True)
        self._previous_profile = None  # the files on disk are the reference again
        self._profile_changed(old.profile, new.profile, "reload")
        p = new.profile
        log.info("configuration reloaded", profile=p.name, version=p.version, restart=restart)
        return {
            "profile": p.describe(),
            "machine_reloaded": machine_changed,
            "restart_required": restart,
        }

    async def push_profile(
        self, text: str, origin: str, *, signature: str | None = None, rollback: bool = False
    ) -> dict[str, Any]:
        """Make a firmware profile sent by the line active between cycles, if it is certified.

        It must validate (ConfigError naming every problem, ``origin:line: key: message``), carry
        a valid detached signature by a key of ``profile_keys`` and be newer than the active
        profile, unless ``rollback`` and it was accepted before (ProfileRefused saying why). On
        any refusal nothing changed. The profile in use is kept for ``rollback_profile``.
        """
        config, current = self.active.config, self.active.profile
        profile = await load_pushed_profile(origin, text, max_bytes=config.commands.max_payload)
        driver = profile_for(profile, config, text=text)  # check-config's checks
        profile.signature = verify_profile(
            text.encode(),
            None if signature is None else signature.encode(),
            profile_keyring(config),
            name=profile.name,
            version=profile.version,
            origin=origin,
        )
        if rollback and profile.content_hash not in self._accepted:
            raise ProfileRefused(
                "not_accepted_before",
                f"{origin}: {profile.name} {profile.version} was never active on this station; "
                "a rollback can only return to a profile accepted before",
            )
        if not rollback and not is_newer(profile.version, current.version):
            raise ProfileRefused(
                "not_newer",
                f"{origin}: version {profile.version} is not newer than the active "
                f"{current.version}; push it with rollback: true to return to an accepted one",
            )
        await self._swap(self._with_profile(profile, driver))
        self._previous_profile = current
        self._profile_changed(current, profile, "rollback" if rollback else "push")
        return {"profile": profile.describe(), "previous": current.describe()}

    async def rollback_profile(self) -> dict[str, Any]:
        """Go back to the profile that was active before the last push (between cycles)."""
        previous, current = self._previous_profile, self.active.profile
        if previous is None:
            raise ConfigError(
                [ConfigProblem(current.source, None, "", "no previous profile to roll back to")]
            )
        await self._swap(self._with_profile(previous, None))
        self._previous_profile = current  # a rollback can itself be undone
        self._profile_changed(current, previous, "rollback")
        return {"profile": previous.describe(), "previous": current.describe()}

    def _with_profile(self, profile: Profile, driver: MachineDriver | None) -> ActiveStation:
        """The active station with another profile (and a new driver for it); keys are kept."""
        config = dataclasses.replace(self.active.config, profile=profile)
        return ActiveStation.build(config, self._wiring, driver=driver, keyring=self.active.keyring)

    async def _swap(self, station: ActiveStation, *, reloaded: bool = False) -> None:
        """Between cycles: ``station`` takes over from the active one, which stops."""
        async with self.machine_lock:
            await station.take_over(self.active)
            self.active = station
            if reloaded:
                self._on_reload(station.config)

    def _profile_changed(self, old: Profile, new: Profile, how: str) -> None:
        """The envelope changed: log it and tell the line who certified what changed."""
        self._accepted[new.content_hash] = new
        while len(self._accepted) > _ACCEPTED_KEPT:
            del self._accepted[next(iter(self._accepted))]
        if old.content_hash == new.content_hash:
            return
        changes = envelope_changes(old, new)
        log.warning(
            "firmware profile changed",
            how=how,
            profile=new.name,
            version=new.version,
            previous=old.version,
            signed_by=new.signature.key_id if new.signature else None,
            changes=len(changes),
        )
        event = messages.event(
            self.active.config.gateway_id,
            "profile_changed",
            how=how,
            profile=new.describe(),
            previous=old.describe(),
            changes=changes,
        )
        self._publish("events", event, 1)


class ActiveAdjustments:
    """Where adjustment sets arrive (the retained topic, ThingsBoard): the active station's."""

    def __init__(self, control: LineControl) -> None:
        self._control = control

    def on_message(self, topic: str, payload: bytes, properties: Any) -> None:
        self._control.active.adjustments.on_message(topic, payload, properties)
