"""Nothing leaves the machine, and the Bento's dependencies are exact.

The package stage (a real `python -m pipeline.stages package`: bentoml build, ONNX Runtime, the
infra-validation server) and then `bentoml serve` of the Bento it built, under requests for
HOLD_S seconds (tests/offline_session.py), run in a network namespace with only loopback up
(`unshare --net`) under `strace -f`, which logs every connect, sendto and sendmsg of every
process and thread, Python or native (ONNX Runtime's telemetry thread is C++). In that
namespace nothing can get out, yet each attempt is still a logged syscall: a DNS lookup is a
connect to the nameserver. The test fails listing every address that is not loopback.

Needs root (or CAP_SYS_ADMIN) for `unshare --net`, and strace and ip: without them the tests
skip, or fail when env CI is set (.ci/run installs strace).
"""
from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.core.import_closure import outside_imports
from tests.closed_network import leaving, run_closed
from tests.tiny_bento import write_ingested, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
HOLD_S = 15  # s of requests to the served Bento; ONNX Runtime 1.29-1.32 looked up ~9 s in
@pytest.fixture(scope="module")
def closed_session(closed_network, tmp_path_factory):
    """tests/offline_session.py in the closed network on a tiny image model and a tiny text
    model: both packaged, then both Bentos served at once."""
    from tests.test_text_service import write_ingested_texts, write_tiny_text_model

    root = tmp_path_factory.mktemp("offline")
    write_tiny_model(root / "selected")
    write_ingested(root / "ingested", 12, seed=5)
    write_tiny_text_model(root / "text_selected")
    write_ingested_texts(root / "text_ingested", 12, seed=5)
    out, trace = root / "session.json", root / "strace.txt"
    done = run_closed([sys.executable, "-m", "tests.offline_session",
                       "--model", str(root / "selected"), "--data", str(root / "ingested"),
                       "--model", str(root / "text_selected"), "--data",
                       str(root / "text_ingested"), "--home", str(root / "bentoml"),
                       "--hold-s", str(HOLD_S), "--out", str(out)], trace, timeout_s=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"result": json.loads(out.read_text()), "trace": trace, "home": root / "bentoml"}


def assert_nothing_left(session: dict, model: int, endpoint: str) -> None:
    result = session["result"]
    package = result["package"][model]
    assert package["returncode"] == 0, package["stderr"]
    assert result["served_s"] >= HOLD_S
    assert {f"{endpoint} 200", "/readyz 200"} <= set(result["responses"]), result["responses"]
    assert all(status.endswith(" 200") for status in result["responses"]), result["responses"]
    found = leaving(session["trace"])
    assert not found, "traffic past loopback (count, pid<process> syscall address):\n" + \
        "\n".join(f"{n:4d} {what}" for what, n in sorted(found.items()))


def test_the_trace_names_every_address_that_would_leave(closed_network, tmp_path):
    """The harness itself: a UDP connect, an IPv6 sendto and a DNS lookup are caught, a loopback
    connect is not."""
    probe = ("import socket\n"
             "def attempt(call, *args):\n"
             "    try: call(*args)\n"
             "    except OSError: pass\n"
             "attempt(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect, ('192.0.2.1', 53))\n"
             "attempt(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto, b'x', ('2001:db8::1', 9))\n"
             "attempt(socket.getaddrinfo, 'example.com', 80)\n"
             "attempt(socket.create_connection, ('127.0.0.1', 9))\n")
    done = run_closed([sys.executable, "-c", probe], tmp_path / "strace.txt", timeout_s=60)
    assert done.returncode == 0, done.stderr
    seen = " ".join(leaving(tmp_path / "strace.txt"))
    assert "connect 192.0.2.1:53" in seen and "sendto 2001:db8::1:9" in seen
    assert seen.count(":53") >= 2, seen  # the lookup asked a nameserver
    assert "127.0.0.1:9" not in seen


@pytest.mark.parametrize("packages, message", [
    (["numpy", "no-such-package"], "no-such-package: required by bentofile.yaml python.packages "
                                   "for the Bento, but not installed here"),
    (["numpy<2"], f"numpy {metadata.version('numpy')} is installed, but bentofile.yaml "
                  "python.packages requires numpy<2"),
])
def test_a_bento_package_that_cannot_be_pinned_is_named(packages, message, tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))  # before bentoml is imported
    from pipeline import StageError
    from pipeline.lifecycle.bento_build import pinned_packages

    with pytest.raises(StageError, match=re.escape(message)):
        pinned_packages(packages)


@pytest.mark.slow
def test_a_stage_and_the_server_send_nothing_past_loopback(closed_session):
    assert_nothing_left(closed_session, 0, "/classify")


@pytest.mark.slow
def test_a_text_model_s_stage_and_server_send_nothing_past_loopback(closed_session):
    """The same for a text model's Bento (the same session): its tokenizer and the packages
    `tokenizers` pulls into the Bento (huggingface-hub and its requirements) stay off the
    network."""
    assert_nothing_left(closed_session, 1, "/classify_text")


@pytest.mark.slow
def test_the_bento_pins_its_whole_closure_to_the_installed_versions(closed_session):
    name, version = closed_session["result"]["package"][0]["report"]["champion"]["bento_tag"].split(":")
    requirements_txt = closed_session["home"] / "bentos" / name / version / "env/python/requirements.txt"
    requirements = [Requirement(line) for line in requirements_txt.read_text().splitlines()
                    if line.strip()]
    pinned = {canonicalize_name(r.name): r for r in requirements}
    assert len(pinned) == len(requirements), "a package is listed twice"
    for name, requirement in pinned.items():
        assert str(requirement.specifier) == f"=={metadata.version(name)}", requirement
    # Complete: what the service imports, and everything each listed package requires here.
    providers = metadata.packages_distributions()
    for module in sorted(outside_imports("pipeline.serving.service") - set(sys.stdlib_module_names)):
        assert any(canonicalize_name(d) in pinned for d in providers[module]), module
    for name in pinned:
        for required in map(Requirement, metadata.requires(name) or []):
            if required.marker is None or required.marker.evaluate({"extra": ""}):
                assert canonicalize_name(required.name) in pinned, f"{name} requires {required}"
    assert {"uvloop", "httptools"} <= set(pinned)  # not imported: uvicorn picks them up
