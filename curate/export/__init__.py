"""Trainer layouts and trainer configs for exported subsets."""

from curate.export.layouts import LAYOUTS, check_rules, convert_rows

__all__ = ["LAYOUTS", "check_rules", "convert_rows"]
