"""Great Expectations Data Docs that are the same bytes on every run with the same data, so
`dvc repro` on unchanged data leaves dvc.lock unchanged and a pulled clone is up to date.

GX 1.24 puts the wall-clock time into a build four ways, and one random id; each is pinned here
(the validate stage calls `site_config`, `run_id` and `pin_load_times`):
- the run id (a folder name, the index, page breadcrumbs): one fixed RunIdentifier whose name
  carries the data's hash and whose time is RUN_TIME, written in UTC whatever the host's zone;
- the batch's load time (`ge_load_time`), which GX sets with no switch: rewritten in the stored
  results before the pages are rendered;
- a `?d=<now>` cache-buster on the logo URL and a uuid4 in collapsible blocks' ids: the page
  views below leave them out (ids stay unique: the block's own id comes first).
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

from great_expectations.render.view import DefaultJinjaPageView
from jinja2 import pass_context

# Not a time the data was checked: a fixed stamp, so the pages do not change on a rerun.
RUN_TIME = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)


class StablePageView(DefaultJinjaPageView):
    """GX's page view without its per-build randomness."""

    def generate_html_element_uuid(self, prefix=None):
        return prefix or ""

    @pass_context
    def add_data_context_id_to_url(self, jinja_context, url, add_datetime=True):
        return super().add_data_context_id_to_url(jinja_context, url, add_datetime=False)


class StableIndexView(StablePageView):
    _template = "index_page.j2"


def site_config(docs: Path) -> dict:
    """A filesystem Data Docs site at `docs`, rendered by the stable views."""
    view = {"module_name": __name__, "class_name": StablePageView.__name__}
    return {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(docs.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder", "view": {
            **view, "class_name": StableIndexView.__name__}},
        "site_section_builders": {section: {"view": view}
                                  for section in ("expectations", "validations")},
    }


def run_id(data_hash: str):
    """The run id of every validation: named after the data, timed at RUN_TIME."""
    from great_expectations.core.run_identifier import RunIdentifier

    # GX writes run times in the host's local zone (RunIdentifierSchema): pin it to UTC.
    os.environ["TZ"] = "UTC"
    time.tzset()
    return RunIdentifier(run_name=f"data-{data_hash[:12]}", run_time=RUN_TIME)


def pin_load_times(context) -> None:
    """Set each stored result's batch load time to RUN_TIME, before the docs are built."""
    store = context.validation_results_store
    for key in store.list_keys():
        stored = store.get(key)
        stored.meta["batch_markers"]["ge_load_time"] = RUN_TIME.strftime("%Y%m%dT%H%M%S.%fZ")
        store.set(key, stored)
