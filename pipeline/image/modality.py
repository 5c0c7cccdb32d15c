"""The image modality as the stages call it (pipeline/modality.py has the interface)."""
from __future__ import annotations

from pipeline.image.preprocess import Preprocessing


class Image:
    name = "image"
    unit = "images"
    preprocessing = Preprocessing
    model_files: tuple[str, ...] = ()

    # --- ingest and validate ---------------------------------------------------------------

    # --- augment, train and compress -------------------------------------------------------

    # --- evaluate, package and serving -----------------------------------------------------


MODALITY = Image()
