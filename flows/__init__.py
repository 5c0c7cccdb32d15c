"""Kiln's Prefect orchestration: a flow that runs the dvc.yaml stages in order, and its schedule.

Orchestration only: the stages' work lives in `pipeline/`, and DVC decides what is up to date.
"""
import os

# Nothing may leave the machine. Prefect's server posts usage data unless told not to, and it
# reads its settings once, on first import: every flows module imports prefect after this package.
# Prefect's client (3.8) has its own telemetry, switched off by the DO_NOT_TRACK convention.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
