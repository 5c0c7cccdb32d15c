"""Kiln's pipeline: one module per dvc.yaml stage, and the small shared modules they import.

Kept import-light: every stage and the BentoML service import it.
"""


class StageError(RuntimeError):
    """A stage cannot do its job because of its input; the message names the cause."""
