"""The pipeline: a flow's declared stage list, run by an executor.

- :mod:`curate.pipeline.stage`: the :class:`Stage` contract and the :class:`Run` state;
- :mod:`curate.pipeline.build`: :func:`build_stages` (flow spec → stage list; each kind of stage is
  one file of :mod:`curate.stages`) and the models' store keys;
- :mod:`curate.pipeline.context`: what scorers and rewriters get from the run;
- :mod:`curate.pipeline.execute`: :func:`execute` (the whole run, written once for any executor);
- :mod:`curate.pipeline.plan`: :func:`plan` (the dry run behind ``curate plan``);
- :mod:`curate.pipeline.summary`: the run summary (run.json) and the counts table.

Choosing the executor (Prefect or in-process) is :func:`curate.launch.run`'s job, so nothing here
imports the Prefect flow. The names below are imported on first use: a stage file imports
:mod:`curate.pipeline.stage` without loading the stage list that imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Run": "curate.pipeline.stage", "Stage": "curate.pipeline.stage", "build_stages": "curate.pipeline.build",
          "execute": "curate.pipeline.execute", "plan": "curate.pipeline.plan"}

__all__ = ["Run", "Stage", "build_stages", "execute", "plan"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'curate.pipeline' has no attribute '{name}'")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # the function, not the submodule of the same name (execute, plan) that importing it bound here
    return value
