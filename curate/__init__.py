"""curate: instruction-data curation and selection.

ingest → score → select → (rewrite) → export → (train), as a Prefect flow described by one YAML file::

    from curate import load_flow, run
    summary = run(load_flow("flows/select.yaml"))
"""

from curate.version import __version__


def __getattr__(name):  # keep `import curate` light: heavy modules load on first use
    if name == "load_flow":
        from curate.config import load_flow

        return load_flow
    if name == "run":
        from curate.launch import run

        return run
    raise AttributeError(name)


__all__ = ["__version__", "load_flow", "run"]
