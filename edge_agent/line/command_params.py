"""What a command message must look like: its envelope, each command's params, and the error
every refusal is answered with (``line/commands.py`` answers, ``line/command_handlers.py`` runs)."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import Field, StrictInt, ValidationError

from ..yamlfile import StrictModel


class CommandError(Exception):
    """A command answered ``ok: false``; ``code`` is stable, the message says what happened."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class _Params(StrictModel):
    """A command's ``params``: a key it does not know is refused, not ignored."""


class NoParams(_Params):
    pass


class ReadParams(_Params):
    points: list[str] = Field(min_length=1, max_length=500)


class ProfileParams(_Params):
    yaml: str = Field(min_length=1, max_length=1_000_000)  # the profile file's text
    signature: str | None = Field(None, max_length=4096)  # its detached .sig file's text
    rollback: bool = False  # return to a profile accepted before, even if its version is older


class WriteParams(_Params):
    values: dict[str, float | int | bool | str] = Field(min_length=1, max_length=123)


M = TypeVar("M", bound=_Params)


class Envelope(StrictModel):
    correlation_id: Annotated[str, Field(min_length=1, max_length=200)] | StrictInt
    params: dict[str, Any] = Field(default_factory=dict)


def parse_params(model: type[M], params: dict[str, Any]) -> M:
    """``params`` as ``model``, or CommandError ``invalid_params`` naming what is wrong."""
    try:
        return model.model_validate(params)
    except ValidationError as err:
        raise CommandError("invalid_params", first_error(err, "params")) from None


def first_error(err: ValidationError, prefix: str = "") -> str:
    """Every problem pydantic found, in words: ``params.points: List should have ...``."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts)
