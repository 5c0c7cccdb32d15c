"""Regenerate the committed web assets in vendor/ from the npm registry, so every page Kiln
produces renders with no network:

- vendor/dvc_plots.html: the HTML template of `dvc plots show` (.dvc/config `plots.html_template`)
  with vega, vega-lite and vega-embed inlined, at the versions dvc_render's default template loads
  from a CDN. It has no `{scripts}` placeholder, so DVC cannot add its CDN script tags to it.
- vendor/data_docs/: the CSS, JS and fonts Great Expectations' Data Docs load from CDNs, copied
  into every Data Docs build (pipeline/data_docs.py), and urls.json: CDN URL -> file here.

    .venv/bin/python vendor/build.py

Each tarball is checked against the sha512 integrity pinned below (the registry's
`dist.integrity`, `npm view <package>@<version> dist.integrity`) before anything is extracted.
Files are written byte for byte as the packages ship them.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGISTRY = "https://registry.npmjs.org"

# npm package@version -> (sha512 integrity of its tarball, licence file inside it or None)
PACKAGES = {
    "vega@5.20.2": ("qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==", "LICENSE"),
    "vega-lite@5.2.0": ("Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==", "LICENSE"),
    "vega-embed@6.18.2": ("wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==", "LICENSE"),
    "jquery@3.7.1": ("m4avr8yL8kmFN8psrbFFFmB/If14iN5o9nw/NgnnM+kybDJpRsAynV2BsfpTYrTRysYUdADVD7CkUUizgkpLfg==", "LICENSE.txt"),
    # No licence file in the package: MIT per its package.json, and the banner of popper.min.js.
    "popper.js@1.12.9": ("s0EEi9xiSCdqz9lV4IiVH5yIZnDX/U1t0tCjB+0jXx9jW8lrR7kOpVupiUg175ogqVoudpDXHF1p6dKATCHMeg==", None),
    "bootstrap@4.3.1": ("rXqOmH1VilAt2DyPzluTi2blhk17bO7ef+zLLPlWvG494pDxcM234pJ8wTc/6R40UWizAIIMgxjvxZg5kmsbag==", "LICENSE"),
    "bootstrap-table@1.19.1": ("WvV+l1AI/C+zThaKmfHmi/IuayVNB0qdFyEhFx1jyZhO0oLtNJNANkCR3rvJf6Dkh72dsLElxpE/bzK9seEQLA==", "LICENSE"),
    "bootstrap-table@1.19.0": ("L+USHm3X9FKocx/6yngGu12yF6r6s1Ntuc+hoIK2a2QQJjHw5kcySLiE2HY/9sEaSGAOfPbfQOtBH3uKkcpqEA==", "LICENSE"),
    "bootstrap-datepicker@1.9.0": ("9rYYbaVOheGYxjOr/+bJCmRPihfy+LkLSg4fIFMT9Od8WwWB/MB50w0JO1eBgKUMbb7PFHQD5uAfI3ArAxZRXA==", "LICENSE"),
    "@forevolve/bootstrap-dark@1.1.0": ("A3ucpEpxPoTVO490lZZCfjPXxv832l7mm1IxX3bXyxvgwnPGXDLyh7dWrphXKO8YBAu3EswbBEu3VSW8NRMW3A==", "LICENSE"),
    "@fortawesome/fontawesome-free@6.6.0": ("60G28ke/sXdtS9KZCpZSHHkCbdsOGEhIUGlwq6yhY74UpTiToIh8np7A8yphhM4BWsvNFtIvLpi4co+h9Mr9Ow==", "LICENSE.txt"),
}

# What dvc_render 1.0.2's VegaRenderer.SCRIPTS loads from cdn.jsdelivr.net, in its order.
DVC_PLOTS_SCRIPTS = [("vega@5.20.2", "build/vega.min.js"),
                     ("vega-lite@5.2.0", "build/vega-lite.min.js"),
                     ("vega-embed@6.18.2", "build/vega-embed.min.js")]

# Each CDN URL in Great Expectations 1.24.1's page templates -> (package, file inside it).
# vega@5 / vega-lite@5 / vega-embed@6 float on the CDN: the releases DVC's template uses satisfy
# them. GX links bootstrap-dark's unminified CSS and bootstrap-table-filter-control.css: the
# minified files of the same releases are the same rules in a sixth of the bytes.
DATA_DOCS_URLS = {
    "https://cdn.jsdelivr.net/npm/vega@5": ("vega@5.20.2", "build/vega.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-lite@5": ("vega-lite@5.2.0", "build/vega-lite.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-embed@6": ("vega-embed@6.18.2", "build/vega-embed.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        ("@fortawesome/fontawesome-free@6.6.0", "css/all.min.css"),
    "https://code.jquery.com/jquery-3.7.1.min.js": ("jquery@3.7.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js":
        ("popper.js@1.12.9", "dist/umd/popper.min.js"),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js":
        ("bootstrap@4.3.1", "dist/js/bootstrap.min.js"),
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css":
        ("bootstrap@4.3.1", "dist/css/bootstrap.min.css"),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        ("bootstrap-table@1.19.1", "dist/bootstrap-table.min.js"),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        ("bootstrap-table@1.19.1", "dist/bootstrap-table.min.css"),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        ("bootstrap-table@1.19.1", "dist/extensions/filter-control/bootstrap-table-filter-control.min.js"),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        ("bootstrap-table@1.19.0", "dist/extensions/filter-control/bootstrap-table-filter-control.min.css"),
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        ("bootstrap-table@1.19.0", "dist/extensions/filter-control/bootstrap-table-filter-control.min.css"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        ("bootstrap-datepicker@1.9.0", "dist/js/bootstrap-datepicker.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        ("bootstrap-datepicker@1.9.0", "dist/css/bootstrap-datepicker.min.css"),
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        ("@forevolve/bootstrap-dark@1.1.0", "dist/css/bootstrap-prefers-dark.min.css"),
}
# Files the ones above load by relative URL: Font Awesome's all.min.css names ../webfonts/*
# (.woff2, and .ttf for browsers without woff2).
DATA_DOCS_EXTRA = [("@fortawesome/fontawesome-free@6.6.0", f"webfonts/{name}.{ext}")
                   for name in ("fa-brands-400", "fa-regular-400", "fa-solid-900",
                                "fa-v4compatibility") for ext in ("woff2", "ttf")]

DVC_TEMPLATE = """<!DOCTYPE html>
<!-- The page of `dvc plots show`, self-contained (no network): generated by vendor/build.py. -->
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""
PLACEHOLDERS = ("{refresh_tag}", "{plot_divs}", "{scripts}")  # what dvc_render replaces


def package_folder(package: str) -> str:
    """'@scope/name@1.2.3' -> 'name-1.2.3'."""
    name, version = package.rsplit("@", 1)
    return f"{name.rsplit('/', 1)[-1]}-{version}"


def fetch(package: str) -> dict[str, bytes]:
    """The files of an npm package tarball (paths without the leading 'package/'), after its
    sha512 matches the pinned integrity."""
    name, version = package.rsplit("@", 1)
    url = f"{REGISTRY}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"
    data = urllib.request.urlopen(url, timeout=60).read()
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != PACKAGES[package][0]:
        raise SystemExit(f"{url}: sha512 {digest} is not the pinned {PACKAGES[package][0]}")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile()}


def check_dvc_versions() -> None:
    """The pinned versions must be the ones the installed dvc_render's template loads."""
    from dvc_render.vega import VegaRenderer

    loaded = re.findall(r'src="https://cdn\.jsdelivr\.net/npm/([^"]+)"', VegaRenderer.SCRIPTS)
    pinned = [package for package, _ in DVC_PLOTS_SCRIPTS]
    if loaded != pinned:
        raise SystemExit(f"dvc_render loads {loaded}; update DVC_PLOTS_SCRIPTS and PACKAGES ({pinned})")


def inline_script(package: str, code: str, licence: str) -> str:
    for bad in ("</script", *PLACEHOLDERS):
        if bad in code:
            raise SystemExit(f"{package}: its code contains {bad!r}, which would break the template")
    if "-->" in licence:
        raise SystemExit(f"{package}: its licence text would end the HTML comment early")
    return f"    <!-- {package}, {licence.strip()} -->\n    <script>{code}</script>"


def main() -> None:
    check_dvc_versions()
    files = {package: fetch(package) for package in PACKAGES}

    def licence(package: str) -> str:
        name = PACKAGES[package][1]
        return files[package][name].decode() if name else "MIT licence (package.json)"

    scripts = [inline_script(p, files[p][path].decode(), licence(p)) for p, path in DVC_PLOTS_SCRIPTS]
    template = DVC_TEMPLATE.format(scripts="\n".join(scripts))
    (HERE / "dvc_plots.html").write_text(template, encoding="utf-8")

    out = HERE / "data_docs"
    shutil.rmtree(out, ignore_errors=True)
    urls = {}
    wanted = [*DATA_DOCS_URLS.values(), *DATA_DOCS_EXTRA]
    wanted += [(p, PACKAGES[p][1]) for p in {p for p, _ in wanted} if PACKAGES[p][1]]
    for package, path in wanted:
        target = out / package_folder(package) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[package][path])
    for url, (package, path) in DATA_DOCS_URLS.items():
        urls[url] = f"{package_folder(package)}/{path}"
    (out / "urls.json").write_text(json.dumps(urls, indent=2, sort_keys=True) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"vendor/dvc_plots.html: {len(template.encode()) / 1e3:.0f} kB; "
          f"vendor/data_docs: {size / 1e3:.0f} kB in {len(wanted) + 1} files")


if __name__ == "__main__":
    main()
