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

GX's pages also load their CSS, JS, icon fonts and logo from CDNs and end with a newsletter
link; offline they lose their run list, styling and icons. `make_offline` (run by validate after
the build) copies the vendored assets (vendor/data_docs, from npm: vendor/README.md) into the site
and points the pages at them; the views leave the newsletter footer out.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import time
from pathlib import Path

from great_expectations.render.view import DefaultJinjaPageView
from jinja2 import ChoiceLoader, DictLoader, pass_context

from pipeline import StageError

# Not a time the data was checked: a fixed stamp, so the pages do not change on a rerun.
RUN_TIME = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)

# The vendored CSS/JS/fonts, and urls.json: each CDN URL of GX's templates -> a file there.
VENDOR = Path(__file__).resolve().parents[2] / "vendor" / "data_docs"
# GX's logo URLs -> the images GX itself copies into the site's static/ folder. No dark-mode logo
# ships with GX: dark mode shows the light one.
GX_IMAGES = {"https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png":
             "images/logo-long.png",
             "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png":
             "images/logo-long.png"}
# GX 1.24 links validation pages' favicon one folder short (static_images_dir in favicon.j2).
FAVICON = re.compile(r'href="[./]*static/images/favicon\.ico"')
# A link to a page outside (GX's site): its text stays, the link goes.
EXTERNAL_LINK = re.compile(r'<a\s[^>]*href="https?://[^"]*"[^>]*>(.*?)</a>', re.DOTALL)
# What a browser would fetch from outside: a src, a <link> href, a CSS url().
EXTERNAL_LOAD = re.compile(r"""(?:\bsrc\s*=\s*|<link\b[^>]*\bhref\s*=\s*|url\(\s*)"""
                           r"""["']?(https?://[^"')\s>]+)""")


class StablePageView(DefaultJinjaPageView):
    """GX's page view without its per-build randomness or its newsletter footer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env.loader = ChoiceLoader([DictLoader({"cloud-footer.j2": ""}), self.env.loader])

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
            **view, "class_name": StableIndexView.__name__},
            "show_how_to_buttons": False},  # a footer of links to GX's online tutorials
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


def make_offline(docs: Path) -> None:
    """Copy the vendored assets into the built site at `docs` (static/vendor/), point its pages
    and stylesheets at them and at GX's own copied logo, and keep the text of links to outside
    pages without the link. Raises StageError naming the page if one still loads anything from
    outside (a GX release with a new CDN URL: add it to vendor/build.py)."""
    static = docs / "static"
    shutil.copytree(VENDOR, static / "vendor", ignore=shutil.ignore_patterns("urls.json"))
    urls = {url: f"vendor/{path}" for url, path in
            json.loads((VENDOR / "urls.json").read_text()).items()}
    urls.update(GX_IMAGES)
    cdn = re.compile("(" + "|".join(map(re.escape, sorted(urls, key=len, reverse=True)))
                     + r""")(?=["'?)])""")  # a whole URL: quoted, in url(), or with a query
    for page in sorted([*docs.rglob("*.html"), *docs.rglob("*.css")]):
        prefix = Path(os.path.relpath(static, page.parent)).as_posix()
        built = page.read_text(encoding="utf-8")
        text = cdn.sub(lambda url: f"{prefix}/{urls[url[1]]}", built)
        text = FAVICON.sub(f'href="{prefix}/images/favicon.ico"', EXTERNAL_LINK.sub(r"\1", text))
        if loads := EXTERNAL_LOAD.findall(text):
            raise StageError(f"{page}: Data Docs page loads {sorted(set(loads))} from outside; "
                             f"vendor them (vendor/build.py)")
        if text != built:
            page.write_text(text, encoding="utf-8")
