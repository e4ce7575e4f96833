"""Dotted key paths into nested dicts and lists: `set_path(values, "train.optimizer.lr", 0.1)`."""
from __future__ import annotations

from typing import Any

from trainers.errors import ConfigError


def set_path(values: dict[str, Any], key: str, value: Any) -> None:
    """Set `values[a][b][c] = value` for key `a.b.c`, creating mappings on the way (a number indexes a list)."""
    *parents, last = key.split(".")
    node: Any = values
    for depth, part in enumerate(parents):
        child = _child(node, part, key)
        if child is None:
            child = node[_index(node, part, key)] = {}
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"{key}: {'.'.join(parents[:depth + 1])} holds {child!r}, not a mapping")
        node = child
    node[_index(node, last, key)] = value


def _child(node: dict | list, part: str, key: str) -> Any:
    index = _index(node, part, key)
    return node.get(index) if isinstance(node, dict) else node[index]


def _index(node: dict | list, part: str, key: str) -> str | int:
    if isinstance(node, dict):
        return part
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: {part!r} is not a position in a list of {len(node)}")
    return int(part)
