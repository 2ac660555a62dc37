"""Small helpers on nested dictionaries."""
from __future__ import annotations


def flatten(d: dict, sep: str = ".", prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (with ``sep`` between the levels)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, sep, key + sep) if isinstance(v, dict) else {key: v})
    return out
