"""Registries map a method name to ``"module:Class"``; classes are imported on first use, so heavy
dependencies load only when a flow uses the method."""

from __future__ import annotations

import importlib


def load_class(registry: dict[str, str], kind: str, method: str) -> type:
    try:
        target = registry[method]
    except KeyError:
        raise KeyError(f"unknown {kind} '{method}' (known: {', '.join(sorted(registry))})") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
