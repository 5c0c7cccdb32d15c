"""The text modality as the stages call it (pipeline/modality.py has the interface)."""
from __future__ import annotations

from pipeline.text.tokens import TOKENIZER_FILE, TextPreprocessing


class Text:
    name = "text"
    unit = "texts"
    preprocessing = TextPreprocessing
    model_files = (TOKENIZER_FILE,)

    # --- ingest and validate ---------------------------------------------------------------

    # --- augment, train and compress -------------------------------------------------------

    # --- evaluate, package and serving -----------------------------------------------------


MODALITY = Text()
