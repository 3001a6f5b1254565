"""Configuration files of the agent and the controller: TOML (or JSON), checked by a pydantic model.

A file ending in ``.toml`` is TOML, one ending in ``.json`` is JSON; any other name is JSON when its first
character is ``{``, else TOML. The model decides what is valid (``extra="forbid"``: an unknown key is an error
naming the key, the keys that exist and the closest one). Every problem is one ``ConfigInvalid`` naming the file.
"""
from __future__ import annotations

import difflib
import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from kvmotion.common.errors import ConfigInvalid, KvmotionError

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
M = TypeVar("M", bound=BaseModel)


def read_config_file(path: Path, missing_remedy: str) -> dict[str, Any]:
    """The file's contents as a table (TOML or JSON, see the module's docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigInvalid(f"no configuration file at {path}", remedy=missing_remedy,
                            details={"file": str(path), "keys": []}) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigInvalid(f"cannot read {path}: {exc}", remedy="check the file's permissions and encoding (UTF-8)",
                            details={"file": str(path), "keys": []}) from exc
    is_json = path.suffix == ".json" or (path.suffix != ".toml" and text.lstrip().startswith("{"))
    try:
        data = json.loads(text) if is_json else tomllib.loads(text)
    except ValueError as exc:       # json.JSONDecodeError and tomllib.TOMLDecodeError both are
        kind = "JSON" if is_json else "TOML"
        raise ConfigInvalid(f"{path} is not valid {kind}: {exc}", remedy="correct the syntax at that line",
                            details={"file": str(path), "keys": []}) from exc
    if not isinstance(data, dict):
        raise ConfigInvalid(f"{path} holds a {type(data).__name__}, not a table of keys",
                            remedy="write the keys at the top level (key = value)",
                            details={"file": str(path), "keys": []})
    return data


def validate_config(model: type[M], data: dict[str, Any], source: str) -> M:
    """``data`` checked by ``model``; every problem of it in one ``ConfigInvalid``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems, fixes, keys = [], [], []
        for err in exc.errors():
            key = ".".join(str(part) for part in err["loc"])
            keys.append(key)
            problem, fix = _explain(model, err, key)
            problems.append(problem)
            fixes.append(fix)
        raise ConfigInvalid(f"{source}: " + "; ".join(problems), remedy="; ".join(dict.fromkeys(fixes)),
                            details={"file": source, "keys": keys}) from None


def _explain(model: type[BaseModel], err: Any, key: str) -> tuple[str, str]:
    """One validation error as (problem, fix)."""
    if err["type"] == "extra_forbidden":
        known = sorted(model.model_fields) if len(err["loc"]) == 1 else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = f" (the keys: {', '.join(known)})" if known else ""
        return f"unknown key {key!r}", f"{hint}remove or rename {key!r}{listed}"
    if err["type"] == "missing":
        return f"missing key {key!r}", f"add {key!r} (required)"
    got = repr(err["input"])
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{key!r}: {err['msg']} (got {got})", f"correct the value of {key!r}"


def load_config(model: type[M], path: Path, missing_remedy: str) -> M:
    """The file at ``path``, read and checked by ``model``."""
    return validate_config(model, read_config_file(path, missing_remedy), str(path))


def dump_toml(data: dict[str, Any], header: str = "") -> str:
    """``data`` as TOML: scalars, lists of scalars and tables of scalars inline, lists of tables as ``[[key]]``.

    ``None`` values are left out (TOML has no null; every model field that may be None defaults to it)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    tables = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    for key, value in data.items():
        if value is not None and key not in tables:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, rows in tables.items():
        for row in rows:
            lines += ["", f"[[{_key(key)}]]"] + [f"{_key(k)} = {_value(v)}" for k, v in row.items() if v is not None]
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else _string(key)


def _string(text: str) -> str:
    # a JSON string is a TOML basic string, but for DEL, which TOML wants escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan" if math.isnan(value) else repr(value)
    if isinstance(value, (str, Path)):
        return _string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def fail(prog: str, exc: KvmotionError) -> NoReturn:
    """End a command-line program with the error and its fix on stderr (exit status 2)."""
    print(f"{prog}: error: {exc.message}", file=sys.stderr)
    if exc.remedy:
        print(f"{prog}: fix: {exc.remedy}", file=sys.stderr)
    raise SystemExit(2)
