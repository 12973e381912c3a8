"""Machine outage: how soon after the machine answers again does the first part run ``ok``?

    python benchmarks/outage.py [--rounds 5] [--gap 0.05] [--default-backoff]

Each round kills the reference OPC UA machine (its own process, SIGKILL as by a power cut) while
a whole station (simulated reader, real agent, mosquitto) runs, presents a new part every ``gap``
seconds, starts the machine again on the same port and stops at the first ``ok``. It prints, per
round, the seconds from the machine answering again (the simulator's endpoint is up) to that
report, how many parts were refused meanwhile (``machine_unavailable``) and whether any was
reported failed. The backoff is 60..120 s unless ``--default-backoff`` (0.2..30 s): a part's
arrival attempts the connection at once whatever it says.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


async def main(rounds: int, gap: float, default_backoff: bool) -> None:
    from edge_agent.log import setup_logging
    from edge_agent.sim.broker import EmbeddedBroker
    from tests.fixtures_opcua import OpcUaMachineProcess, machine_yaml, opcua_station
    from tests.system.test_machine_outage import LONG_BACKOFF, present, through_outage

    setup_logging("error", "console")
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # its own lines about the killed server
    backoff = {"reconnect_min": 0.2, "reconnect_max": 30.0} if default_backoff else LONG_BACKOFF
    broker = EmbeddedBroker()
    await broker.start()
    figures: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        machine = OpcUaMachineProcess(Path(tmp) / "server-pki")
        machine.start()
        try:
            async with opcua_station(
                Path(tmp), broker.port, machine_yaml(machine.url, **backoff)
            ) as station:
                warm = await present(station, 1)
                assert warm.report.status == "ok", warm.report.error
                for r in range(rounds):
                    outage = await through_outage(station, machine, gap=gap)
                    statuses = {p.report.reason for p in outage.refused}
                    if outage.first_ok is None:
                        print(f"round {r + 1}: no ok within the limit")
                        continue
                    figures.append(outage.first_ok_s)
                    print(
                        f"round {r + 1}: first ok {outage.first_ok_s:.3f} s after the machine "
                        f"answered again; {len(outage.refused)} parts refused meanwhile "
                        f"(reasons: {', '.join(sorted(str(s) for s in statuses)) or 'none'})"
                    )
        finally:
            machine.stop()
            await broker.stop()
            broker.close()
    if figures:
        print(
            f"first ok after the machine is back: median {statistics.median(figures):.3f} s, "
            f"max {max(figures):.3f} s over {len(figures)} rounds (aim: < 1 s)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between parts")
    parser.add_argument("--default-backoff", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.gap, args.default_backoff))
