"""Shared test settings: nothing phones home from any test, whatever the caller's environment says."""
import os

import pytest

os.environ.update(DVC_NO_ANALYTICS="1", BENTOML_DO_NOT_TRACK="True", DO_NOT_TRACK="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A throwaway Prefect API and database; Prefect's home (memo store, storage) in a tmp dir."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect_home")}), prefect_test_harness():
        yield
