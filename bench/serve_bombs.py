"""Serving under hostile load: many clients posting valid images with decompression bombs and
oversized .npy batches mixed in, against one or more Bentos (e.g. the service before and after
a change), one after the other, same machine, same requests.

    python bench/serve_bombs.py [--bento TAG ...] [--data data/ingested] [--clients 32] \
        [--duration 30] [--rounds 1] [--out reports/serve_bombs.json]

Load: wrk (Debian package `wrk`), 2 threads, `--clients` keep-alive connections, each sending
its next request as soon as the previous one is answered (closed loop), `--timeout 10s`, for
`--duration` s. The requests cycle through a list of 100: 98 test-split PNGs (POST /classify),
one PNG bomb (13000x13000 RGBA of zeros: ~0.66 MB on the wire, 676 MB decoded) to /classify and
one big .npy (float64 pixels, as many images as fit under serve.max_request_bytes: 1023 at
32x32x1 and 8 MiB) to /classify_npy; wrk's threads start at different points of the list.
Before the load, 3 s of valid images only (wrk, same clients) warm the workers up.

Reported per Bento: completed requests/s over the whole run (every answer, whatever its
status), answers by HTTP status, wrk's socket errors (timeouts above all), p50/p99 latency over
all answered requests (wrk's), and the RSS of each worker process (psutil on the children of
`bentoml serve`): after the warm-up, the peak during the load (sampled every 0.5 s) and 5 s
after the load. With `--rounds N` the load runs N times against the same server (5 s apart), a
result per round, each with the RSS after the warm-up as "before": whether memory climbs round
after round. The client shares the machine's cores with the server (2 here).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("BENTOML_HOME", str(REPO / ".bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

from serve_bench import kiln_server, multipart_post, split_files  # noqa: E402  (bench/ is the script's folder)

MIX = 100            # requests in the cycle: MIX - 2 valid, one PNG bomb, one big .npy
BOMB_SIDE = 13000    # px, of the RGBA PNG bomb (the size the issue measured)
TIMEOUT_S = 10       # wrk's per-request timeout
SAMPLE_S = 0.5       # RSS sampling period during the load

# wrk script: requests are whole HTTP/1.1 requests, one file each, listed in args[1]; answers are
# counted by status per thread and summed in done(), written as JSON to $KILN_WRK_OUT.
WRK_LUA = r"""
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end
function init(args)
  requests = {}
  for name in io.lines(args[1]) do
    local f = io.open(name, "rb"); requests[#requests + 1] = f:read("*a"); f:close()
  end
  i = id * 41
  statuses = {}
end
function request()
  i = i + 1
  return requests[(i % #requests) + 1]
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[tostring(k)] = (total[tostring(k)] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = string.format('"%s": %d', k, v) end
  local e = summary.errors
  local f = io.open(os.getenv("KILN_WRK_OUT"), "w")
  f:write(string.format('{"duration_us": %d, "requests": %d, "statuses": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ' ..
    '"p50_us": %d, "p99_us": %d}', summary.duration, summary.requests,
    table.concat(parts, ", "), e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
  f:close()
end
"""


def requests_files(folder: Path, data: Path, max_request_bytes: int) -> tuple[Path, Path]:
    """Write the request files; return (the mixed list, the valid-only list)."""
    from pipeline.core.card import read_card

    valid = [multipart_post("/classify", "image", "x.png", png, "image/png")
             for _, png in split_files(data, "test")[: MIX - 2]]
    buffer = io.BytesIO()
    Image.new("RGBA", (BOMB_SIDE, BOMB_SIDE)).save(buffer, format="PNG")
    bomb = multipart_post("/classify", "image", "bomb.png", buffer.getvalue(), "image/png")
    p = read_card(REPO / "models" / "selected").preprocessing
    per_image = p.channels * p.image_size ** 2 * 8  # bytes, float64
    images = (max_request_bytes - 4096) // per_image  # 4 KB for the .npy and multipart headers
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((images, p.channels, p.image_size, p.image_size)))
    big = multipart_post("/classify_npy", "array", "big.npy", buffer.getvalue(),
                         "application/octet-stream")
    mixed = [*valid[: MIX // 2 - 1], bomb, *valid[MIX // 2 - 1:], big]
    lists = []
    for name, entries in (("mixed", mixed), ("valid", valid)):
        paths = []
        for k, request in enumerate(entries):
            path = folder / f"{name}-{k:03d}.http"
            path.write_bytes(request)
            paths.append(str(path))
        (folder / f"{name}.txt").write_text("\n".join(paths) + "\n")
        lists.append(folder / f"{name}.txt")
    print(f"requests: {len(valid)} valid PNGs, a {len(buffer.getvalue()) / 1e6:.1f} MB .npy of "
          f"{images} float64 images, a {len(bomb) / 1e6:.2f} MB PNG bomb of {BOMB_SIDE}x{BOMB_SIDE}"
          f" RGBA", file=sys.stderr)
    return lists[0], lists[1]


def workers(port: int) -> list[psutil.Process]:
    """The worker processes of the `bentoml serve ... --port port` on this machine."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "bentoml" in cmdline and "serve" in cmdline and str(port) in cmdline:
            return [c for c in process.children(recursive=True)
                    if "_bentoml_impl.worker.service" in " ".join(c.cmdline())]
    raise RuntimeError(f"no bentoml serve on port {port}")


def rss_mb(processes: list[psutil.Process]) -> list[float]:
    return [round(p.memory_info().rss / 2**20, 1) for p in processes]


def wrk(url: str, script: Path, listing: Path, clients: int, duration_s: int, out: Path) -> dict:
    done = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{duration_s}s",
                           "--timeout", f"{TIMEOUT_S}s", "-s", str(script), url, "--", str(listing)],
                          capture_output=True, text=True, env={**os.environ, "KILN_WRK_OUT": str(out)})
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    return json.loads(out.read_text())


def bench(bento: str, folder: Path, mixed: Path, valid: Path, clients: int, duration_s: int,
          rounds: int) -> list[dict]:
    """`rounds` loads of duration_s one after the other against one server: one result each."""
    script = folder / "load.lua"
    script.write_text(WRK_LUA)
    results = []
    with kiln_server(bento, folder / f"{bento.replace(':', '-')}.log") as (url, _):
        procs = workers(int(url.rsplit(":", 1)[1]))
        wrk(url, script, valid, clients, 3, folder / "warmup.json")
        before = rss_mb(procs)
        for round_ in range(1, rounds + 1):
            peak = rss_mb(procs)
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(SAMPLE_S):
                    peak[:] = map(max, peak, rss_mb(procs))

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                result = wrk(url, script, mixed, clients, duration_s, folder / "load.json")
            finally:
                stop.set()
                sampler.join()
            time.sleep(5)
            seconds = result["duration_us"] / 1e6
            results.append({
                "bento": bento, "round": round_, "rps": round(result["requests"] / seconds, 1),
                "statuses": dict(sorted(result["statuses"].items())),
                "socket_errors": result["errors"], "p50_ms": result["p50_us"] / 1e3,
                "p99_ms": result["p99_us"] / 1e3,
                "worker_rss_mb": {"before": before, "peak": peak, "after": rss_mb(procs)}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bento", action="append",
                        help="Bento tag, once per Bento to compare (default: the champion)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "ingested")
    parser.add_argument("--champion", type=Path, default=REPO / "reports" / "champion.json",
                        help="the champion record (without --bento: its champion is served)")
    parser.add_argument("--export", type=Path, default=REPO / "models" / "champion",
                        help="the exported Bentos the record names")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=int, default=30, help="s of load per Bento")
    parser.add_argument("--rounds", type=int, default=1,
                        help="loads one after the other against each server (memory round after round)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from pipeline.lifecycle.champion import Exports, bento_to_serve
    from pipeline.params import load_params

    bentos = args.bento or [bento_to_serve(args.champion, Exports(args.export))]
    limit = load_params(REPO / "params.yaml").serve.max_request_bytes
    results = {"load_before": os.getloadavg(), "clients": args.clients, "duration_s": args.duration,
               "mix": f"{MIX - 2} valid PNGs, 1 PNG bomb, 1 big .npy per {MIX} requests", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        mixed, valid = requests_files(Path(tmp), args.data, limit)
        for bento in bentos:
            for run in bench(bento, Path(tmp), mixed, valid, args.clients, args.duration, args.rounds):
                results["runs"].append(run)
                print(json.dumps(run), file=sys.stderr)
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    print("\n| Bento | round | req/s | answers by status | timeouts | p50 (ms) | p99 (ms) | worker RSS MB "
          "before / peak / 5 s after |\n|---|---:|---:|---|---:|---:|---:|---|")
    for r in results["runs"]:
        rss = r["worker_rss_mb"]
        print(f"| {r['bento']} | {r['round']} | {r['rps']:.0f} | {r['statuses']} | {r['socket_errors']['timeout']} "
              f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {rss['before']} / {rss['peak']} / "
              f"{rss['after']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
