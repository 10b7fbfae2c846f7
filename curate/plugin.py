"""The one plug-in contract of scorers, selection steps, rewriters and embedders.

A plug-in is a class with a ``method`` name (what a flow writes), a ``version`` (bump it when its
outputs change), optional dependencies ``requires`` and validated ``Params``; a flow builds it as
``cls(name, params, context)``:

- ``name``: the step's label in the flow (``score[i].name`` or its method);
- ``params``: a dict (the flow's keys for this step, validated against ``Params``: an unknown key is
  an error) or an already validated ``Params`` instance (kept as it is);
- ``context``: what the run gives the plug-in beyond its parameters (seed, threads, folders), a
  :class:`Context` of the family's type; None gives the family's defaults (a plug-in built outside a run).

``requires = (("module", "pip install …"),)`` names optional dependencies: the first instance of a
class checks them (once per class and process) and a missing one stops with the install line.

Each family keeps its methods in a :class:`Registry` (``"method" -> "module:Class"``, imported on
first use, so heavy dependencies load only when a flow uses the method):

==========  ==========================  ===============================  ===========================
family      base                        registry                         context
==========  ==========================  ===============================  ===========================
scorer      ``curate.scorers.Scorer``   ``curate.scorers.SCORERS``       ``ScorerContext``
selection   ``curate.select.Selector``  ``curate.select.SELECTORS``      ``SelectContext``
rewriter    ``curate.rewrite.Rewriter`` ``curate.rewrite.REWRITERS``     ``RewriteContext``
embedder    ``curate.embed.Embedder``   ``curate.embed.EMBEDDERS``       ``EmbedContext``
==========  ==========================  ===============================  ===========================
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


@dataclass
class Context:
    """What the run gives a plug-in: ``seed`` (the flow's), ``torch_threads`` (per process), ``base_dir``
    (relative paths in parameters resolve against it), ``store_dir`` (the local store: caches of model
    calls, stored vectors) and ``extra`` (family-specific entries, named where the family documents them)."""

    seed: int = 0
    torch_threads: int | None = 1
    base_dir: str | None = None
    store_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Plugin:
    """Base of every scorer, selection step, rewriter and embedder (see the module docstring)."""

    #: the family, in messages ("scorer 'lang' needs the Python package …")
    kind: ClassVar[str] = "plug-in"
    method: ClassVar[str]
    version: ClassVar[str] = "1.0"
    #: Optional dependencies: (module, pip install line).
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: the family's context type (what ``context=None`` becomes)
    context_type: ClassVar[type[Context]] = Context

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, name: str, params: dict[str, Any] | BaseModel | None = None, context: Context | None = None):
        if not isinstance(name, str):  # the shape before the one contract: cls(params, …)
            raise TypeError(f"{type(self).__name__}(name, params, context): name must be a str (the step's label), got {name!r}")
        self.check_requires()
        self.name = name
        self.params = params if isinstance(params, BaseModel) else self.Params.model_validate(params or {})
        self.context = context if context is not None else self.context_type()

    @classmethod
    def check_requires(cls) -> None:
        """Import each of ``requires`` once per class, or raise :class:`curate.errors.MissingDependency` with its install line."""
        if cls in _REQUIRES_MET:
            return
        from curate.errors import require

        for module, install in cls.requires:
            require(module, f"{cls.kind} '{cls.method}'", install)
        _REQUIRES_MET.add(cls)


#: the plug-in classes whose ``requires`` were found (each is checked once)
_REQUIRES_MET: set[type] = set()


class Registry:
    """A family's methods: ``targets`` maps each method to ``"module:Class"``, imported on first use.

    ``R.get(method)``: the class (an unknown method raises ``KeyError`` naming the known ones);
    ``R.names()``: the methods, sorted; ``method in R``, ``iter(R)``, ``len(R)``, ``R[method]`` (its target)
    as for a dict. A test registers its own plug-in with ``monkeypatch.setitem(R.targets, "mine", "module:Class")``.
    """

    def __init__(self, kind: str, targets: dict[str, str]):
        self.kind = kind  # in the error for an unknown method: "unknown <kind> 'x' (known: …)"
        self.targets = dict(targets)

    def get(self, method: str) -> type:
        """The class ``method`` names (its module imported now)."""
        try:
            target = self.targets[method]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{method}' (known: {', '.join(self.names())})") from None
        module, cls = target.split(":")
        return getattr(importlib.import_module(module), cls)

    def names(self) -> list[str]:
        return sorted(self.targets)

    def __contains__(self, method: object) -> bool:
        return method in self.targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, method: str) -> str:
        return self.targets[method]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.targets!r})"
