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

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.core.import_closure import outside_imports
from tests.tiny_bento import write_ingested, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
HOLD_S = 15  # s of requests to the served Bento; ONNX Runtime 1.29-1.32 looked up ~9 s in
# Set, these switch ONNX Runtime's telemetry off (1.29+ treats CI variables as "running in CI";
# onnxruntime/core/platform/telemetry_environment.h): a test run in CI would not see what a
# user's machine sends. The namespace's processes get none of them.
TELEMETRY_HIDERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS",
                    "JENKINS_URL", "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION",
                    "APPVEYOR", "BITBUCKET_BUILD_NUMBER", "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
                    "ORT_RUNNING_UNIT_TESTS", "ORT_DISABLE_TELEMETRY")
SYSCALL = re.compile(r"^(\d+)(?:<([^>]*)>)? (connect|sendto|sendmsg)\(")
INET = re.compile(r"sa_family=AF_INET6?, sin6?_port=htons\((\d+)\).*?"
                  r"(?:inet_addr\(\"([^\"]+)\"\)|inet_pton\(AF_INET6, \"([^\"]+)\")")


def closed_network_missing() -> str | None:
    """Why a loopback-only namespace under strace cannot be had here, or None."""
    missing = [tool for tool in ("unshare", "strace", "ip") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    probe = run_closed(["true"], Path(os.devnull), timeout_s=60)
    if probe.returncode != 0:  # unshare needs root or CAP_SYS_ADMIN; strace, ptrace (not nested)
        return f"`unshare --net` + `strace -f` failed: {probe.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def closed_network():
    reason = closed_network_missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"no network namespace under strace: {reason}")
    if reason:
        pytest.skip(reason)


def run_closed(command: list[str], trace: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """`command` in a new network namespace with only `lo` up, under strace -f writing every
    connect/sendto/sendmsg (pid<name> per line) to `trace`."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_HIDERS}
    strace = ["strace", "-f", "--seccomp-bpf", "-qq", "-Y", "-e", "trace=connect,sendto,sendmsg", "-e",
              "signal=none", "-o", str(trace)]
    return subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                           *strace, *command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def leaving(trace: Path) -> Counter:
    """"pid<process> syscall address:port" -> how often, for every IPv4/IPv6 destination in the
    trace that is not loopback, and every DNS query (port 53: a loopback resolver forwards it
    out). AF_UNIX and AF_NETLINK never leave. A line with an IP family whose address cannot be
    read counts as leaving, verbatim."""
    found: Counter = Counter()
    for line in trace.read_text(errors="replace").splitlines():
        call = SYSCALL.match(line)
        if call is None or "sa_family=AF_INET" not in line:
            continue
        who = f"{call[1]}<{call[2]}> {call[3]}"
        address = INET.search(line)
        if address is None:
            found[f"{who} (unread) {line}"] += 1
            continue
        ip = ipaddress.ip_address(address[2] or address[3])
        mapped = getattr(ip, "ipv4_mapped", None)
        local = ip.is_loopback or (mapped is not None and mapped.is_loopback)
        if address[1] == "53" or not local:
            found[f"{who} {ip}:{address[1]}"] += 1
    return found


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
    from pipeline.stages.package import pinned_packages

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
