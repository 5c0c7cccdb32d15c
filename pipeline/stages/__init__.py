"""The seven stages dvc.yaml runs, one module each: `python -m pipeline.stages <stage>`. Stages
import what pipeline/core/ shares and call a modality through its seam, never each other."""
