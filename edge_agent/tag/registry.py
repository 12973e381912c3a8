"""Readers found by the config's ``reader.type``; the core knows nothing more.

Each reader module exports:
  SETTINGS_MODEL  a ``ReaderSettings`` subclass: the ``reader:`` section of the config
  create(settings) -> TagReader
Modules are imported only when a config names them; a reader's library (nfcpy, asyncua) only when
the reader opens its device.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, ConfigProblem
from ..yamlfile import Lines, add_suggestions, problems_from_validation
from .reader import ReaderSettings, TagReader

READERS: dict[str, str] = {
    "simulated": "edge_agent.tag.simulated",
    "nfc": "edge_agent.tag.nfc",
    "autoid": "edge_agent.tag.autoid",
}


def reader_module(name: str) -> ModuleType:
    """Import the reader named ``name``. Raises KeyError for an unknown name."""
    return importlib.import_module(READERS[name])


def reader_settings(
    data: Mapping[str, Any], file: str, lines: Lines, at: tuple[str, ...] = ("reader",)
) -> ReaderSettings:
    """The ``reader:`` section ``data`` (found at key path ``at`` of ``file``) validated against
    the settings model of the reader its ``type`` names. Raises ConfigError naming line and key."""
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in READERS:
        message = (
            "required key is missing"
            if kind is None
            else f"'{kind}' is not a reader type: {', '.join(READERS)}"
        )
        where = lines.get((*at, "type"), lines.get(at))
        raise ConfigError([ConfigProblem(file, where, ".".join((*at, "type")), message)])
    model: type[ReaderSettings] = reader_module(str(kind)).SETTINGS_MODEL
    try:
        return model.model_validate(dict(data))
    except ValidationError as err:
        problems = problems_from_validation(err, file, lines, at)
        add_suggestions(problems, model, skip=len(at))
        raise ConfigError(problems) from err


def create_reader(settings: ReaderSettings) -> TagReader:
    """The reader ``settings`` describe, not started; wrapped in a ``ReturnFilter`` when a tag
    presented again is to be ignored (``reader.on_return``)."""
    reader: TagReader = reader_module(settings.type).create(settings)
    if settings.on_return == "ignore":
        from .presence import ReturnFilter

        return ReturnFilter(reader, return_window=settings.return_window)
    return reader
