"""Load YAML keeping line numbers, and turn validation errors into ``file:line: key.path: message``.

Config files and firmware profiles are written by hand by integrators; a mistake must be reported
with the file, the line and the key path, together with every other mistake in the same file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError, ConfigProblem

try:  # the C loader is several times faster; fall back when libyaml is absent
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

Model = TypeVar("Model", bound=BaseModel)
Lines = dict[tuple[str | int, ...], int]


class StrictModel(BaseModel):
    """The base of every model of a document from outside (config, profile, recipe, settings, the
    line's adjustment set): a key it does not know is an error, not silently dropped, and once
    valid it cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _construct(node: yaml.Node, path: tuple[str | int, ...], lines: Lines, file: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in out:
                raise ConfigError(
                    [
                        ConfigProblem(
                            file,
                            key_node.start_mark.line + 1,
                            _dotted((*path, key)),
                            "duplicate key",
                        )
                    ]
                )
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*path, key), lines, file)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    # Scalars: let the safe constructor resolve ints, floats, bools and nulls.
    loader = _Loader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def load_yaml(path: str | Path, text: str | None = None) -> tuple[Any, Lines]:
    """Parse a YAML file; return the plain data and a map from key path to line number."""
    file = str(path)
    try:
        source = Path(path).read_text(encoding="utf-8") if text is None else text
    except OSError as err:
        raise ConfigError([ConfigProblem(file, None, "", f"cannot read: {err.strerror}")]) from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            [ConfigProblem(file, None, "", f"not UTF-8 text (byte {err.start})")]
        ) from err
    try:
        node = yaml.compose(source, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else None
        raise ConfigError(
            [ConfigProblem(file, line, "", f"not valid YAML: {err.problem}")]
        ) from err
    lines: Lines = {}
    if node is None:
        return {}, lines
    return _construct(node, (), lines, file), lines


def check_untrusted(text: str, file: str, *, max_bytes: int, max_depth: int) -> None:
    """Refuse YAML that could exhaust the process before it is composed (pushed profiles).

    libyaml's composer recurses in C (it segfaults at ~30 000 levels of ``[``) and aliases
    expand without bound (a few hundred bytes take minutes). Its event parser keeps its stack on
    the heap: scanning events, stopping at the first alias, anchor or level too deep, costs time
    in proportion to the text alone. Raises ConfigError naming the line.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ConfigError([ConfigProblem(file, None, "", f"{size} bytes, more than {max_bytes}")])
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            problem = None
            if isinstance(event, yaml.AliasEvent):
                problem = f"alias *{event.anchor}: aliases are not accepted here"
            elif isinstance(event, yaml.NodeEvent) and event.anchor is not None:
                problem = f"anchor &{event.anchor}: anchors are not accepted here"
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    problem = f"nested more than {max_depth} levels deep"
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if problem is not None:
                line = event.start_mark.line + 1 if event.start_mark else None
                raise ConfigError([ConfigProblem(file, line, "", problem)])
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else None
        raise ConfigError(
            [ConfigProblem(file, line, "", f"not valid YAML: {err.problem}")]
        ) from err


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_for(path: tuple[str | int, ...], lines: Lines) -> int | None:
    # A missing key has no line of its own: report the line of the nearest parent that exists.
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def problems_from_validation(
    err: ValidationError, file: str, lines: Lines, prefix: tuple[str | int, ...] = ()
) -> list[ConfigProblem]:
    """Translate pydantic's errors into problems that name file, line and key path."""
    problems = []
    for e in _closest_members(err.errors(), lines, prefix):
        path = _data_path(prefix, e["loc"], lines)
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif e["type"] == "missing":
            message = "required key is missing"
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        problems.append(ConfigProblem(file, _line_for(path, lines), _dotted(path), message))
    return problems


def _closest_members(errors: list[Any], lines: Lines, prefix: tuple[str | int, ...]) -> list[Any]:
    """One mistake, one line: a value that matches no member of a union of models (a handshake
    step with a typo) gets errors from every member, 14 lines for ``sett: trigger``. Keep those of
    the member that came closest (the fewest errors): ``sett: unknown key``."""
    groups: dict[tuple[Any, ...], dict[str, int]] = {}
    tags: list[tuple[tuple[Any, ...], str] | None] = []
    for e in errors:
        at = _union_tag(prefix, e["loc"], lines)
        if at is None:
            tags.append(None)
            continue
        where, tag = e["loc"][:at], e["loc"][at]
        members = groups.setdefault(where, {})
        members[tag] = members.get(tag, 0) + 1
        tags.append((where, tag))
    closest = {where: min(members, key=members.__getitem__) for where, members in groups.items()}
    return [e for e, t in zip(errors, tags, strict=True) if t is None or closest[t[0]] == t[1]]


def _union_tag(
    prefix: tuple[str | int, ...], loc: tuple[str | int, ...], lines: Lines
) -> int | None:
    # pydantic names the union member (the model's class name) in ``loc``; it is not a key.
    path = prefix
    for i, part in enumerate(loc[:-1]):
        if (*path, part) in lines:
            path = (*path, part)
        elif isinstance(part, str) and part[:1].isupper():
            return i
    return None


def _data_path(
    prefix: tuple[str | int, ...], loc: tuple[str | int, ...], lines: Lines
) -> tuple[str | int, ...]:
    """Keep the parts of pydantic's ``loc`` that are keys in the file.

    pydantic inserts union tags and validator names into ``loc``; those are not keys a person wrote.
    """
    path = prefix
    for i, part in enumerate(loc):
        if (*path, part) in lines or i == len(loc) - 1:
            path = (*path, part)
    return path


def validate(model: type[Model], data: Any, file: str, lines: Lines) -> Model:
    """Validate ``data`` against ``model``; raise one ConfigError listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = problems_from_validation(err, file, lines)
        add_suggestions(problems, model)
        raise ConfigError(problems) from err


def add_suggestions(problems: list[ConfigProblem], model: type[BaseModel], skip: int = 0) -> None:
    """For an unknown key, name the closest known key at that level ("did you mean ...").

    ``skip``: leading key-path parts that lie outside ``model`` (e.g. 2 for ``points.<name>``).
    """
    for i, problem in enumerate(problems):
        if problem.message != "unknown key":
            continue
        parts = problem.path.replace("[", ".").replace("]", "").split(".")[skip:]
        known = _known_keys(model, parts[:-1])
        close = difflib.get_close_matches(parts[-1], known, n=1)
        if close:
            problems[i] = ConfigProblem(
                problem.file,
                problem.line,
                problem.path,
                f"unknown key (did you mean '{close[0]}'?)",
            )


def _known_keys(model: type[BaseModel], parents: list[str]) -> list[str]:
    # A union of models (a handshake step) at some level: the keys of every member.
    current: list[type[BaseModel]] = [model]
    for part in parents:
        if part.isdigit():  # a list index: the item model was already found through list[...]
            continue
        current = [
            found
            for m in current
            if part in m.model_fields
            for found in _models_of(m.model_fields[part].annotation)
        ]
    return list(dict.fromkeys(key for m in current for key in m.model_fields))


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_of(arg)]
