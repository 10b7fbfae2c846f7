"""The compare flow: one flow run per ``curate compare``; each cell's curation, training and eval
are flow runs of their own inside it (subflows), so the UI shows each with its artifacts.

:func:`run_compare` starts a compare as this flow run or in-process, as :func:`curate.launch.run` does for runs.
Prefect is imported only when a flow run is asked for: ``curate compare --no-prefect`` never loads it."""

from __future__ import annotations

from functools import cache
from typing import Any

from curate.compare import CompareSpec, compare


@cache
def compare_flow():
    """The ``curate-compare`` Prefect flow (made on first use: importing Prefect takes seconds)."""
    import curate.flow  # noqa: F401  (curate's Prefect settings)
    from prefect import flow

    @flow(name="curate-compare", flow_run_name="curate-compare-{name}", persist_result=False, validate_parameters=True)
    def curate_compare(spec: dict[str, Any], path: str, name: str = "") -> dict[str, Any]:
        """Curate, train and evaluate every selection × budget × seed of a compare file (and the base model);
        publish the table."""
        cs = CompareSpec.model_validate(spec)
        cs.path = path
        return compare(cs)

    return curate_compare


def run_compare(spec: CompareSpec) -> dict[str, Any]:
    """:func:`compare` as a Prefect flow run (``prefect: true``, the default) or in-process."""
    if not spec.prefect:
        return compare(spec)
    return compare_flow()(spec=spec.model_dump(mode="json"), path=spec.path, name=spec.name)
