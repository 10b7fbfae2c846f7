"""Rewriters: methods that make new rows from existing ones (methods.md Part C).

``mosaic`` (Mosaic-IT, C3) composes several single-turn rows into one multi-instruction row without a
model; its wording lists live in ``mosaic_text``.
"""
