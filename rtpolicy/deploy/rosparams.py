"""Typed ROS 2 parameters for the deploy nodes, and ``key=value`` command-line overrides.

Each node lists its parameters once as ``{name: (default, description)}``; the default's Python type
is the parameter's type (float -> double, list of floats -> double array, ...). Overrides from the
command line or from Python are coerced to that type here, so ``control_rate_hz=20`` (an int) or
``max_velocity=1`` (a scalar) do not fail deep inside rclpy with a type mismatch, and an unknown
name is an error that lists the known ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

ParamTable = Mapping[str, tuple[Any, str]]


def parse_key_values(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``["bundle=PATH", "control_rate_hz=20", "--ros-args", ...]`` -> (overrides, ROS arguments).

    Values are read as JSON when they parse (numbers, true/false, lists, objects), else kept as strings.
    """
    ros_args: list[str] = []
    if "--ros-args" in args:
        i = args.index("--ros-args")
        args, ros_args = args[:i], args[i:]
    out: dict[str, Any] = {}
    for item in args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out, ros_args


def coerce(name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``; ValueError naming the parameter otherwise."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError("expected true or false")
            return value
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError("expected a number")
            return float(value)
        if isinstance(default, int):
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError("expected an integer")
            return int(value)
        if isinstance(default, str):
            return value if isinstance(value, str) else json.dumps(value)
        if isinstance(default, list):
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, bool) for v in items):
                raise TypeError("expected numbers")
            return [float(v) for v in items]
    except (TypeError, ValueError) as e:
        raise ValueError(f"parameter {name}: {value!r} is not a valid {type(default).__name__} ({e})") from e
    raise TypeError(f"parameter {name}: unsupported default type {type(default).__name__}")


def parameter_overrides(overrides: Mapping[str, Any] | None, table: ParamTable) -> list:
    """rclpy Parameters for ``Node(parameter_overrides=...)``; unknown names raise ValueError."""
    from rclpy.parameter import Parameter

    overrides = dict(overrides or {})
    if unknown := sorted(set(overrides) - set(table)):
        raise ValueError(f"unknown parameters {unknown}; known: {sorted(table)}")
    return [Parameter(k, value=coerce(k, v, table[k][0])) for k, v in overrides.items()]


def declare(node, table: ParamTable) -> None:
    """Declare every parameter of ``table`` on ``node`` with its description."""
    from rcl_interfaces.msg import ParameterDescriptor

    for name, (default, description) in table.items():
        # dynamic typing: a YAML file's 1 for 1.0 is accepted here and coerced (or refused clearly) by values()
        node.declare_parameter(name, default, ParameterDescriptor(description=description, dynamic_typing=True))


def values(node, table: ParamTable) -> dict[str, Any]:
    """The node's current values of ``table``'s parameters, coerced (a YAML file may give 1 for 1.0)."""
    return {name: coerce(name, node.get_parameter(name).value, default) for name, (default, _) in table.items()}
