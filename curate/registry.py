"""Registries map a method name to ``"module:Class"``; classes are imported on first use, so heavy
dependencies load only when a flow uses the method. The type is :class:`curate.plugin.Registry`."""

from __future__ import annotations

from curate.plugin import Registry


def load_class(registry: Registry | dict[str, str], kind: str, method: str) -> type:
    """The class ``method`` names in ``registry`` (a :class:`Registry`, or a plain ``{method: "module:Class"}`` dict)."""
    if isinstance(registry, Registry):
        return registry.get(method)
    return Registry(kind, registry).get(method)


__all__ = ["Registry", "load_class"]
