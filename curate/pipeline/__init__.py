"""The pipeline: a flow's declared stage list, run by an executor.

- :mod:`curate.pipeline.stage`: the :class:`Stage` contract and the :class:`Run` state;
- :mod:`curate.pipeline.stages`: the stages and :func:`build_stages` (flow spec → stage list);
- :mod:`curate.pipeline.execute`: :func:`execute` (the whole run, written once for any executor);
- :mod:`curate.pipeline.plan`: :func:`plan` (the dry run behind ``curate plan``).

Choosing the executor (Prefect or in-process) is :func:`curate.launch.run`'s job, so nothing here
imports the Prefect flow.
"""

from curate.pipeline.execute import execute
from curate.pipeline.plan import plan
from curate.pipeline.stage import Run, Stage
from curate.pipeline.stages import build_stages

__all__ = ["Run", "Stage", "build_stages", "execute", "plan"]
