"""The one plug-in contract (curate/plugin.py): every registered scorer, selection step, rewriter and
embedder is a Plugin with its family's context, built as cls(name, params, context)."""

from __future__ import annotations

import pytest

from curate.embed import EMBEDDERS, EmbedContext, EmbedSpec, Embedder, build_embedder
from curate.errors import MissingDependency
from curate.plugin import Context, Plugin, Registry
from curate.rewrite import REWRITERS, RewriteContext, Rewriter
from curate.scorers import SCORERS, Scorer, ScorerContext
from curate.select import SELECTORS, SelectContext, Selector

FAMILIES = [(SCORERS, Scorer, ScorerContext), (SELECTORS, Selector, SelectContext), (REWRITERS, Rewriter, RewriteContext),
            (EMBEDDERS, Embedder, EmbedContext)]


@pytest.mark.parametrize("registry, base, context", FAMILIES, ids=["scorers", "selectors", "rewriters", "embedders"])
def test_every_registered_method_is_a_plugin_of_its_family(registry, base, context):
    assert issubclass(base, Plugin) and issubclass(context, Context) and base.context_type is context
    for method in registry:
        cls = registry.get(method)
        assert issubclass(cls, base) and cls.method == method, method
    assert registry.names() == sorted(registry) and len(registry) == len(registry.names())


def test_registry_names_the_known_methods():
    reg = Registry("widget", {"b": "curate.plugin:Plugin", "a": "curate.plugin:Context"})
    assert "a" in reg and "c" not in reg and list(reg) == ["b", "a"] and reg["a"] == "curate.plugin:Context"
    assert reg.get("b") is Plugin
    with pytest.raises(KeyError, match=r"unknown widget 'c' \(known: a, b\)"):
        reg.get("c")


def test_plugin_validates_params_and_checks_requires_once(monkeypatch):
    import curate.errors

    class Mine(Plugin):
        kind = "scorer"
        method = "mine"
        requires = (("json", "pip install json"),)

        class Params(Plugin.Params):
            n: int = 1

    seen = []
    real = curate.errors.require
    monkeypatch.setattr(curate.errors, "require", lambda module, step, install=None: seen.append(module) or real(module, step, install))
    a, b = Mine("a", {"n": 2}), Mine("b", Mine.Params(n=3))
    assert (a.params.n, b.params.n, seen) == (2, 3, ["json"])  # checked once per class
    assert isinstance(a.context, Context) and a.name == "a"
    with pytest.raises(ValueError, match="extra"):
        Mine("c", {"m": 1})

    class Missing(Plugin):
        kind = "selection step"
        method = "missing"
        requires = (("no_such_module_xyz", "pip install 'curate[xyz]'"),)

    with pytest.raises(MissingDependency, match=r"selection step 'missing' needs .*pip install 'curate\[xyz\]'"):
        Missing("m")


def test_selector_and_embedder_take_the_common_shape():
    from curate.select import selector_class

    step = selector_class("top_k")("best", {"score": "s.x", "budget": 3}, SelectContext(step_index=2, base_dir="/data"))
    assert (step.name, step.step_index, step.base_dir, step.context.torch_threads) == ("best", 2, "/data", None)
    spec = EmbedSpec(method="precomputed", model="m")
    e = build_embedder(spec, 3)
    assert e.spec is e.params is spec and e.torch_threads == 3 and isinstance(e.context, EmbedContext)
    assert type(e)("embed", spec).key == e.key  # the key does not depend on the context
