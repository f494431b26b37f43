"""Reading a Config: from a nested dict (YAML, JSON), one `section.key=value` at a time, or a
YAML file, converting each value to its field's declared type and refusing unknown keys by name."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from medfed.common.config import Config
from medfed.common.errors import MedfedError


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type or say what was expected."""
    allowed = [a for a in typing.get_args(hint)] or [hint]
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            # YAML 1.1 reads `1e-4` (no dot) as a string; it is the form people type.
            try:
                number = float(value)
            except (ValueError, OverflowError):  # not a number; an int beyond float range
                number = math.inf if isinstance(value, int) else None
            if number is not None:
                if not math.isfinite(number):
                    # `.inf`, `.nan`, `1e400`: no setting means them (an infinite learning rate
                    # or alpha passes every "> 0" check and silently ruins the run).
                    raise MedfedError(f"config key '{key}' has value {value!r}; expected a finite number")
                return number
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if typing.get_origin(kind) is list and isinstance(value, list) and all(
                isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value):
            # A list of names (class names may hold commas, e.g. BreastMNIST's "normal, benign").
            return [str(item) for item in value]
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed)
    raise MedfedError(f"config key '{key}' has value {value!r}; expected {names}")


def from_dict(raw: dict[str, Any], *, origin: str = "config") -> Config:
    """Build a Config from a nested dict, refusing unknown keys by name."""
    if not isinstance(raw, dict):
        raise MedfedError(f"{origin} must be a mapping of sections, got {type(raw).__name__}")
    config = Config()
    sections = _sections()
    for name, value in raw.items():
        if name not in sections:
            raise MedfedError(
                f"{origin}: unknown key '{name}'; allowed top-level keys: {', '.join(sections)}"
            )
        hint = sections[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise MedfedError(f"{origin}: '{name}' must be a mapping, got {value!r}")
            for key, item in value.items():
                set_value(config, f"{name}.{key}", item, origin=origin)
        else:
            set_value(config, name, value, origin=origin)
    return config


def set_value(config: Config, dotted: str, value: Any, *, origin: str = "--set") -> None:
    """Set one `section.key` (or top-level key) with type checking."""
    parts = dotted.split(".")
    sections = _sections()
    if parts[0] not in sections:
        raise MedfedError(
            f"{origin}: unknown key '{dotted}'; allowed top-level keys: {', '.join(sections)}"
        )
    hint = sections[parts[0]]
    if dataclasses.is_dataclass(hint):
        section = getattr(config, parts[0])
        hints = typing.get_type_hints(hint)
        if len(parts) != 2 or parts[1] not in hints:
            raise MedfedError(
                f"{origin}: unknown key '{dotted}'; keys in '{parts[0]}': "
                + ", ".join(f"{parts[0]}.{k}" for k in hints)
            )
        setattr(section, parts[1], _coerce(dotted, value, hints[parts[1]]))
    else:
        if len(parts) != 1:
            raise MedfedError(f"{origin}: unknown key '{dotted}'")
        setattr(config, dotted, _coerce(dotted, value, hint))


def parse_assignment(text: str) -> tuple[str, Any]:
    """`federation.rounds=20` -> ("federation.rounds", 20); values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MedfedError(f"--set expects key=value (e.g. federation.rounds=20), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except _YAML_ERRORS as exc:
        raise MedfedError(f"--set {key}: cannot read value {raw!r} ({_yaml_problem(exc)})") from None
    return key.strip(), value


def load_yaml(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise MedfedError(f"config file {path} does not exist; pass an existing YAML file to --config")
    return from_dict(read_yaml(path, what="config file") or {}, origin=str(path))


def read_yaml(path: Path, *, what: str) -> Any:
    """A YAML file's content, or one line saying why it cannot be read: not text (a binary file,
    not UTF-8), not YAML, or not readable at all."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MedfedError(
            f"{what} {path} is not a YAML text file (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start} is not UTF-8 text; is it a binary file?)"
        ) from None
    except OSError as exc:
        raise MedfedError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except _YAML_ERRORS as exc:
        raise MedfedError(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None


# PyYAML's safe loader also fails with plain Python errors on some text: an impossible date
# (`2024-13-45` is read as a timestamp: ValueError), an explicit tag with a bad value (`!!int x`,
# `!!bool x`, `!!timestamp x`: ValueError, KeyError, AttributeError, IndexError) or nesting deeper
# than the interpreter's stack (RecursionError). All are the text's fault, so all are reasons.
_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RecursionError)


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if not isinstance(exc, yaml.YAMLError):
        return "a value cannot be read: " + " ".join(f"{type(exc).__name__}: {exc}".split())
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"
