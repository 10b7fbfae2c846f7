"""curate's version string: its own module, so the stages that stamp it into outputs import nothing else of curate."""

__version__ = "0.1.0"
