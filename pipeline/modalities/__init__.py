"""One package per modality (data.modality), each holding the parts of the seam that
pipeline/core/modality.py lists."""
