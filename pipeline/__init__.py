"""Kiln's pipeline stages, one module each, in the order of dvc.yaml.

Kept import-light: the BentoML service imports pipeline.preprocess from here.
"""

MODEL_NAME = "kiln-classifier"  # BentoML model store name: package writes it, the service serves it


class StageError(RuntimeError):
    """A stage cannot do its job because of its input; the message names the cause."""
