"""Checked reading of one decoded msgpack map: each field by type and range, each array by dtype,
shape and byte count. Every failure is a ``WireError`` with its reason; nothing else is raised."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from grokwatch.wire.errors import WireError
from grokwatch.wire.limits import Limits

_INT64_MAX = 2**63 - 1


class Reader:
    """Typed field access over one decoded map; every failure is a WireError."""

    def __init__(self, obj: dict, limits: Limits):
        self.obj = obj
        self.limits = limits

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise WireError("missing_field", f"missing field {key!r}")
        return self.obj[key]

    def str(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise WireError("field_type", f"{key!r} must be a string")
        check_str(value, key, self.limits)
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.str(key)
        if value not in allowed:
            raise WireError("value_range", f"{key!r} must be one of {allowed}, got {value!r}")
        return value

    def int(self, key: str, lo: int = 0, hi: int = _INT64_MAX) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError("field_type", f"{key!r} must be an integer")
        if not lo <= value <= hi:
            raise WireError("value_range", f"{key!r}={value} outside [{lo}, {hi}]")
        return value

    def bool(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise WireError("field_type", f"{key!r} must be a boolean")
        return value

    def float(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError("field_type", f"{key!r} must be a number")
        if not math.isfinite(value):
            raise WireError("non_finite", f"{key!r} is not finite")
        return float(value)

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise WireError("field_type", f"{key!r} must be a list of strings")
        for v in value:
            check_str(v, key, self.limits)
        return tuple(value)

    def number_map(self, key: str, integer: bool) -> dict:
        value = self._get(key)
        if not isinstance(value, dict):
            raise WireError("field_type", f"{key!r} must be a map")
        if len(value) > self.limits.max_map_entries:
            raise WireError("too_many", f"{key!r} has {len(value)} entries")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise WireError("field_type", f"{key!r} keys must be strings")
            check_str(k, key, self.limits)
            if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
                raise WireError("field_type", f"{key!r}[{k!r}] must be {'an integer' if integer else 'a number'}")
            if integer and not 0 <= v <= _INT64_MAX:
                raise WireError("value_range", f"{key!r}[{k!r}]={v} must be a non-negative count")
            if not integer and not math.isfinite(v):
                raise WireError("non_finite", f"{key!r}[{k!r}] is not finite")
            out[k] = v if integer else float(v)
        return out

    def optional_array(self, key: str, dtype: str, shape: tuple[int, ...]) -> Optional[np.ndarray]:
        return self.array(key, dtype, shape) if key in self.obj else None

    def array(self, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        value = self._get(key)
        if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
            raise WireError("field_type", f"{key!r} must be an array map with dtype, shape, data")
        if value["dtype"] != dtype:
            raise WireError("dtype", f"{key!r} must have dtype {dtype}, got {value['dtype']!r}")
        got_shape = value["shape"]
        if not isinstance(got_shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in got_shape
        ):
            raise WireError("field_type", f"{key!r} shape must be a list of integers")
        if tuple(got_shape) != shape:
            raise WireError("shape", f"{key!r} has shape {tuple(got_shape)}, expected {shape}")
        data = value["data"]
        if not isinstance(data, bytes):
            raise WireError("field_type", f"{key!r} data must be bytes")
        count = math.prod(shape)
        itemsize = np.dtype(dtype).itemsize
        if len(data) != count * itemsize:
            raise WireError("shape", f"{key!r} holds {len(data)} bytes, expected {count * itemsize}")
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def check_str(value: str, key: str, limits: Limits) -> None:
    if len(value) > limits.max_str_len:
        raise WireError("string_length", f"{key!r} is {len(value)} characters, limit {limits.max_str_len}")
