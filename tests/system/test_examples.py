"""Every shipped example recipe is valid against the shipped reference profile, step by step."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.instructions.codec import TAG_CAPACITY, encode_tag
from edge_agent.instructions.recipe import load_recipe
from edge_agent.instructions.signing import KeyRing
from edge_agent.machine import registry
from edge_agent.machine.profile import load_profile
from edge_agent.station.cycle import StationCycle
from edge_agent.tag.simulated import SimulatedReader
from tests import REPO_ROOT

REPO = REPO_ROOT
RECIPES = sorted((REPO / "config" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_example_recipe_fits_and_passes_the_reference_profile(path: Path) -> None:
    recipe = load_recipe(path)
    message = encode_tag(
        recipe,
        bytes.fromhex("04A1B2C3D4E5F6"),
        Ed25519PrivateKey.generate(),
        "mes",
        TAG_CAPACITY["ntag215"],
    )
    assert len(message) <= TAG_CAPACITY["ntag215"]
    profile = load_profile(REPO / "firmware_profiles" / "reference-plc.yaml")
    module = registry.driver_module(profile.driver)
    driver = module.create(
        module.SETTINGS_MODEL(host="127.0.0.1"), profile
    )  # no connection is opened
    cycle = StationCycle(
        gateway_id="gw",
        station="st-20",
        profile=profile,
        driver=driver,
        keyring=KeyRing(),
        reader=SimulatedReader(),
        publish=lambda report: None,
    )
    for index, step in enumerate(recipe.to_steps()):
        encoded, listed = cycle.prepare(
            step, "04A1B2C3D4E5F6", index
        )  # raises PartRejected when invalid
        assert {p["name"] for p in listed} == set(step.parameters)
        assert encoded
