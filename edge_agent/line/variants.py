"""Parts of many variants for the line demo: no two alike, each within its machines' envelopes.

A part is 2 to 5 steps drawn from the operations of the line's machines, in any order, with its
own parameters, material lot and order. About one step in four names the station that must do it
(a fixture only that station has); the rest go to any station whose profile supports the
operation. Values are chosen so each is exactly representable in the point it is written to
(a float32 depth in quarters, a 0.1-scaled feed rate in tenths, ...): the machine then receives
exactly the value the traveler carries.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..instructions.codec import encode_tag
from ..instructions.model import ParamValue, Step
from ..instructions.recipe import Recipe

Params = dict[str, ParamValue]
MATERIALS = ("AL-6061", "AL-7075", "ST-1.4301", "ST-S355", "BR-CW614N", "TI-GR5", "PA66-GF30")
PRODUCTS = ("bracket", "housing", "valve-body", "flange", "bearing-seat", "manifold")
TAG_BYTES = 868  # NTAG216: what the simulated reader's tags hold


def _drill(r: random.Random) -> Params:
    return {
        "spindle_speed": r.randrange(800, 9000, 50),
        "feed_rate": r.randrange(500, 9000) / 10,
        "depth": r.randrange(2, 160) / 4,
        "tool": r.randint(1, 24),
        "dwell": r.randrange(0, 2000, 10),
    }


def _mill(r: random.Random) -> Params:
    return {
        "spindle_speed": r.randrange(2000, 12000, 100),
        "feed_rate": r.randrange(1000, 30000) / 10,
        "depth": r.randrange(1, 40) / 8,
        "tool": r.randint(1, 24),
        "coolant_temp": r.randrange(120, 300) / 10,
    }


def _press(r: random.Random) -> Params:
    return {
        "force": r.randrange(5000, 150000, 250),
        "dwell": r.randrange(100, 3000, 50),
        "coolant_temp": r.randrange(150, 300) / 10,
    }


def _process(r: random.Random) -> Params:
    return {
        "setpoint": r.randrange(100, 400000) / 1000,
        "count": r.randint(1, 50),
        "coolant": r.random() < 0.5,
        "label": f"lot {r.randrange(1000, 9999)}",
    }


def _calibrate(r: random.Random) -> Params:
    return {"setpoint": r.randrange(1, 40) / 4, "label": f"cal {r.randrange(100, 999)}"}


def _press_fit(r: random.Random) -> Params:
    params: Params = {
        "force": r.randrange(20, 240) / 2,
        "speed": r.randrange(50, 5000) / 100,
        "label": f"B{r.randrange(10000, 99999)}",
    }
    if r.random() < 0.6:
        params["hold"] = r.randrange(100, 5000, 10)
    if r.random() < 0.5:
        params["offset"] = r.randrange(-4000, 4000) / 1000
    return params


#: Operation -> parameter generator, for every operation the line's profiles offer.
GENERATORS: dict[str, Callable[[random.Random], Params]] = {
    "drill": _drill,
    "mill": _mill,
    "press": _press,
    "process": _process,
    "calibrate": _calibrate,
    "press_fit": _press_fit,
}


def signature(recipe: Recipe) -> str:
    """What makes a variant: its steps (operation, station, parameters) and material."""
    steps = [(s.operation, s.station, sorted(s.parameters.items())) for s in recipe.steps]
    return hashlib.sha256(repr((steps, recipe.material_lot)).encode()).hexdigest()[:8]


def make_parts(
    count: int,
    capable: Mapping[str, Sequence[str]],
    key: Ed25519PrivateKey,
    key_id: str,
    uid_of: Callable[[int], bytes],
    seed: int = 15,
) -> list[tuple[Recipe, bytes, bytes]]:
    """``count`` parts as (recipe, tag UID, signed NDEF message), no two variants alike.

    ``capable``: operation -> the stations whose profile supports it. The first part goes through
    three stations and has a step with no station, so every line run has both.
    """
    r = random.Random(seed)
    ops = [op for op in GENERATORS if capable.get(op)]
    seen: set[str] = set()
    parts: list[tuple[Recipe, bytes, bytes]] = []
    order, left_in_order = 5000, 0
    while len(parts) < count:
        i = len(parts)
        if left_in_order == 0:
            order, left_in_order = order + 1, r.randint(1, 4)
        if i == 0 and {"drill", "process", "press_fit"} <= set(ops):
            names = ["drill", "process", "press_fit"]
        else:
            names = [r.choice(ops) for _ in range(r.randint(2, 5))]
        steps: list[Step] = []
        for n, op in enumerate(names):
            named = r.random() < 0.25 and not (i == 0 and n == 0)
            station = r.choice(list(capable[op])) if named or (i == 0 and n > 0) else None
            steps.append(Step(op, GENERATORS[op](r), station))
        uid = uid_of(i)
        while True:
            recipe = Recipe.from_steps(
                part_id=f"P-{i + 1:05d}",
                product=r.choice(PRODUCTS),
                variant="tmp",
                order=f"ORD-{order}",
                material_lot=f"{r.choice(MATERIALS)}-{r.randrange(100, 999)}",
                steps=steps,
            )
            variant = f"V-{signature(recipe)}"
            recipe = recipe.model_copy(update={"variant": variant})
            try:
                message = encode_tag(recipe, uid, key, key_id, TAG_BYTES)
                break
            except ValueError:  # does not fit the tag: one step fewer
                if len(steps) <= 2:
                    raise
                steps.pop()
        if variant in seen:
            continue
        seen.add(variant)
        left_in_order -= 1
        parts.append((recipe, uid, message))
    return parts
