"""Recipes: the hand-written YAML a traveler is made from.

```yaml
part_id: P-000123
product: bracket
variant: B-long
order: ORD-4711
material_lot: LOT-77        # optional
steps:
  - operation: drill
    station: st-20          # optional: any station that can drill
    parameters: {spindle_speed: 1200, feed_rate: 350.5, depth: 12.5, tool: 3, dwell: 200}
```

The same limits as the tag decoder apply here, so a recipe that loads also encodes (if it fits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import (
    BeforeValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from ..yamlfile import StrictModel, load_yaml, validate
from .limits import (
    MAX_PARAMS,
    MAX_STEPS,
    name_problem,
    station_problem,
    text_problem,
    value_problem,
)
from .model import Step


def _check_value(value: object) -> object:
    # One clear message instead of one per member of the union below.
    if problem := value_problem(value):
        raise ValueError(problem)
    return value


# Strict: YAML `tool: 3` stays an int and `depth: 12.5` a float; the PLC register type depends on it.
RecipeValue = Annotated[
    StrictBool | StrictInt | StrictFloat | StrictStr, BeforeValidator(_check_value)
]


def _text_field(value: object, problem_of: Callable[[object], str | None] = text_problem) -> object:
    if not isinstance(value, str):
        # YAML turns `order: 004711` into the number 4711; silently losing the zeros is worse.
        raise ValueError("must be text; quote it in YAML, e.g. '004711'")
    if problem := problem_of(value):
        raise ValueError(problem)
    return value


class RecipeStep(StrictModel):
    operation: str
    station: str | None = None
    parameters: Annotated[dict[str, RecipeValue], Field(max_length=MAX_PARAMS)] = {}

    @field_validator("operation", mode="before")
    @classmethod
    def _operation(cls, value: object) -> object:
        if problem := name_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("station", mode="before")
    @classmethod
    def _station(cls, value: object) -> object:
        return None if value is None else _text_field(value, station_problem)

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameter_names(cls, value: object) -> object:
        if isinstance(value, dict):
            for name in value:
                if problem := name_problem(name):
                    raise ValueError(f"parameter name {name!r} {problem}")
        return value


class Recipe(StrictModel):
    """What the MES wants done to one part, before it is signed and bound to a tag."""

    part_id: str
    product: str
    variant: str
    order: str
    material_lot: str | None = None
    steps: Annotated[list[RecipeStep], Field(min_length=1, max_length=MAX_STEPS)]

    @field_validator("part_id", "product", "variant", "order", mode="before")
    @classmethod
    def _texts(cls, value: object) -> object:
        return _text_field(value)

    @field_validator("material_lot", mode="before")
    @classmethod
    def _lot(cls, value: object) -> object:
        return None if value is None else _text_field(value)

    def to_steps(self) -> tuple[Step, ...]:
        return tuple(
            Step(operation=s.operation, parameters=dict(s.parameters), station=s.station)
            for s in self.steps
        )

    @classmethod
    def from_steps(
        cls,
        *,
        part_id: str,
        product: str,
        variant: str,
        order: str,
        steps: Sequence[Step],
        material_lot: str | None = None,
    ) -> Recipe:
        """Build (and validate) a recipe in code, e.g. for the demo. Raises pydantic's ValidationError."""
        return cls.model_validate(
            {
                "part_id": part_id,
                "product": product,
                "variant": variant,
                "order": order,
                "material_lot": material_lot,
                "steps": [
                    {
                        "operation": s.operation,
                        "station": s.station,
                        "parameters": dict(s.parameters),
                    }
                    for s in steps
                ],
            }
        )


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe file. Raises ConfigError listing every ``file:line: key: problem``."""
    data, lines = load_yaml(path)
    return validate(Recipe, data, str(path), lines)
