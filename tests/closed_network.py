"""A loopback-only network namespace under strace: a command run in it cannot reach anything
outside the machine, and every attempt (a connect, a DNS query) is a logged syscall that
`leaving` names. Needs root (or CAP_SYS_ADMIN) for `unshare --net`, and strace and ip."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from tests.project import REPO

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
