"""What tells several runs apart: the config keys whose values differ, and a short label per run.

Used by the tables of several stores (`gentrace.training.sweep.over_stores`: one column per varying
key) and by the figures' legends (`gentrace.reporting.plots`: `n_train=50, hidden=[32]` rather
than the store's directory name), so both name a sweep point the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}, e.g. {"data.n_train": 300}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def varying_keys(trees: Sequence[Mapping[str, Any]]) -> list[str]:
    """Dotted config keys whose values differ between the configs, in config order."""
    flats = [flatten(tree) for tree in trees]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    return [key for key in keys if len({json.dumps(flat.get(key), sort_keys=True) for flat in flats}) > 1]


def text(value: Any) -> str:
    """A config value as a label shows it: lists and tables as compact JSON, `true`/`false`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def labels(trees: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> list[str]:
    """One label per config from its varying keys, last key part only: `n_train=50, hidden=[32]`.

    Empty strings when no key varies (one config, or identical ones). A key whose last part is shared
    by another varying key keeps its full dotted name, so labels stay unambiguous.
    """
    keys = varying_keys(trees) if keys is None else list(keys)
    short = [key.rsplit(".", 1)[-1] for key in keys]
    names = [s if short.count(s) == 1 else key for key, s in zip(keys, short, strict=True)]
    return [
        ", ".join(f"{name}={text(flatten(tree).get(key))}" for name, key in zip(names, keys, strict=True))
        for tree in trees
    ]


def cell(value: Any) -> Any:
    """A config value as a table cell: lists and tables as JSON text (one scalar per cell), the rest as is."""
    return json.dumps(value) if isinstance(value, list | dict) else value
