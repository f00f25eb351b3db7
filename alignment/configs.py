"""Dataclass configs and their YAML loading: unknown keys are errors with a did-you-mean.

Each trainer or job pairs with a dataclass (`DPOConfig` in trainers/dpo.py, ...). `load_config(cls,
path, overrides)` reads YAML, applies command-line overrides and checks every key and nested section.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

MIN_KEY = "min"  # dataclass field metadata: the smallest value a count may take


def count(default: int | None, minimum: int = 1, **kwargs: Any) -> Any:
    """A dataclass field holding a count (steps, images, batch size ...): an int >= `minimum`, or None when
    the field allows it. `from_dict` (so `load_config`) and `check_counts` refuse anything else.

    Example:
        >>> @dataclass
        ... class Sampling:
        ...     num_steps: int = count(50)            # >= 1
        ...     save_every: int = count(0, minimum=0)  # 0 means off
    """
    return dataclasses.field(default=default, metadata={MIN_KEY: minimum}, **kwargs)


def _check_count(value: Any, minimum: int, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}; got {value!r}.")


def check_counts(cfg: Any, where: str = "") -> None:
    """Check every `count` field of a dataclass config and of its nested sections (for configs built in code;
    `load_config` already checks those it reads).

    Raises:
        ValueError: naming the dotted key, e.g. ``validation.num_inference_steps must be an integer >= 1; got 0``.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if MIN_KEY in f.metadata:
            _check_count(value, f.metadata[MIN_KEY], key)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_counts(value, key)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _dataclass_in(tp) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields.

    Raises:
        ValueError: an unknown key (with close matches) or a section that is not a mapping.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping of keys to values; got {type(data).__name__}.")
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(types_), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown key {k!r} in {where}.{hint} Valid keys: {', '.join(sorted(types_))}.")
    kwargs = {}
    minimums = {f.name: f.metadata[MIN_KEY] for f in dataclasses.fields(cls) if MIN_KEY in f.metadata}
    for k, v in data.items():
        sub = _dataclass_in(types_[k])
        if sub is not None and isinstance(v, Mapping):
            kwargs[k] = from_dict(sub, v, f"{where}.{k}")
        else:
            kwargs[k] = _coerce(v, types_[k], f"{where}.{k}")
        if k in minimums:
            _check_count(kwargs[k], minimums[k], f"{where}.{k}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """YAML reads `1e-5` as a string and `3` where a float is meant; coerce plain scalars to the field type."""
    base = tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        base = args[0] if len(args) == 1 else tp
    if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number; got {value!r}.") from None
    if base is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} must be an integer; got {value!r}.") from None
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false; got {value!r}.")
    return value


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str] | Mapping[str, Any] | None) -> dict:
    """Apply ``a.b=value`` strings (YAML-parsed values) or a mapping of dotted keys onto nested dicts."""
    if not isinstance(overrides, Mapping):
        for o in overrides or []:
            if "=" not in str(o):
                raise ValueError(f"override {o!r} must look like key=value (e.g. train.lr=1e-5).")
    # `key=null` sets None (e.g. train.checkpoints_total_limit=null).
    items = overrides.items() if isinstance(overrides, Mapping) else [
        (o.split("=", 1)[0], _parse_value(o.split("=", 1)[1])) for o in (overrides or [])
    ]
    for key, value in items:
        node = data
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {p!r} is not a section.")
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides=None) -> T:
    """Read YAML at `path` (optional), apply overrides, and build `cls` with key checking."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {str(p)!r} (see configs/ for examples).")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p} must hold a YAML mapping at the top level; got {type(data).__name__}.")
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path) if path else "config")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return p
