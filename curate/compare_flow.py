"""The compare flow: one flow run per ``curate compare``; each cell's curation, training and eval
are flow runs of their own inside it (subflows), so the UI shows each with its artifacts.

:func:`run_compare` starts a compare as this flow run or in-process, as :func:`curate.launch.run` does for runs."""

from __future__ import annotations

from typing import Any

import curate.flow  # noqa: F401  (curate's Prefect settings)
from prefect import flow

from curate.compare import CompareSpec, compare


@flow(name="curate-compare", flow_run_name="curate-compare-{name}", persist_result=False, validate_parameters=True)
def compare_flow(spec: dict[str, Any], path: str, name: str = "") -> dict[str, Any]:
    """Curate, train and evaluate every selection × budget × seed of a compare file (and the base model);
    publish the table."""
    cs = CompareSpec.model_validate(spec)
    cs.path = path
    return compare(cs)


def run_compare(spec: CompareSpec) -> dict[str, Any]:
    """:func:`compare` as a Prefect flow run (``prefect: true``, the default) or in-process."""
    if not spec.prefect:
        return compare(spec)
    return compare_flow(spec=spec.model_dump(mode="json"), path=spec.path, name=spec.name)
