"""Ingest from records sources at two sizes: wall time, items/s and peak memory of the ingest
stage reading a Parquet file and a folder of WebDataset tar shards (pipeline/core/records.py),
against a folder of class folders holding the same images (issue "Data past memory", item 2:
sources read as streams, none loaded whole).

    python bench/records_bench.py [--sizes 10000 100000] [--out /tmp/kiln_records]
                                  [--sources parquet webdataset folder]

Method, per size N:
- The items: N generated 32x32 digits (pipeline/modalities/image/warped.py, deterministic), as
  PNG bytes, written three ways (--sources): one Parquet file as Hugging Face `datasets` writes it (an
  `image` {bytes, path} struct column, ClassLabel integers named in the schema metadata, a
  `split` column; row groups of 1,000 rows), tar shards of 10,000 samples (`<key>.png`,
  `<key>.cls`) in train/val/test folders, and <split>/<class>/<n>.png files.
- Each source is ingested once by `python -m pipeline.stages ingest --out data/ingested` in a
  project folder of its own (the repo's params.yaml with data.modality image and
  image.ingest.source set), timed by `/usr/bin/time -f "%e %M"`: wall seconds and the peak RSS
  of that process (ingest reads a records source in the stage's own process: no workers).
- One run per size and source: the memory figures do not depend on machine load; times do.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core import executor  # noqa: E402
from pipeline.modalities.image.warped import warped_digits  # noqa: E402
from pipeline.params import load_params  # noqa: E402


def write_sources(root: Path, n: int, kinds: list[str]) -> dict[str, Path]:
    """The n generated digits as a Parquet file, tar shards and class folders under `root`
    (those of `kinds`)."""
    p = load_params(REPO / "params.yaml")
    executor.start(p.engine)  # the digits are made in parallel, as the warped source makes them
    names = [str(d) for d in range(10)]
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64()), ("split", pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    paths = {"parquet": root / "digits.parquet", "webdataset": root / "shards",
             "folder": root / "folder"}
    writer = pq.ParquetWriter(paths["parquet"], schema) if "parquet" in kinds else None
    rows: list[dict] = []
    tars: dict[str, tuple[tarfile.TarFile, int]] = {}
    for k, (_, label, split, _, png) in enumerate(warped_digits(n, p.data.split, p.data.seed)):
        if writer is not None:
            rows.append({"image": {"bytes": png, "path": f"{k}.png"}, "label": int(label),
                         "split": split})
            if len(rows) == 1000:
                writer.write_table(pa.Table.from_pylist(rows, schema))
                rows = []
        if "webdataset" in kinds:
            tar, held = tars.get(split, (None, 0))
            if tar is None or held == 10_000:
                if tar is not None:
                    tar.close()
                folder = paths["webdataset"] / split
                folder.mkdir(parents=True, exist_ok=True)
                count = sum(1 for _ in folder.iterdir())
                tar, held = tarfile.open(folder / f"{split}-{count:05d}.tar", "w"), 0
            for suffix, data in ((".png", png), (".cls", label.encode())):
                info = tarfile.TarInfo(f"{k:08d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            tars[split] = (tar, held + 1)
        if "folder" in kinds:
            target = paths["folder"] / split / label / f"{k:08d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(png)
    if writer is not None:
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema))
        writer.close()
    for tar, _ in tars.values():
        tar.close()
    return {kind: paths[kind] for kind in kinds}


def ingest(root: Path, source: Path) -> dict:
    """The ingest stage on `source` in a project folder under `root`: wall s and peak MB."""
    work = root / f"project_{source.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["modality"] = "image"
    params["image"]["ingest"]["source"] = str(source)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "pipeline.stages",
                           "ingest", "--out", "data/ingested"], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ingest of {source} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    wall, kb = done.stderr.strip().splitlines()[-1].split()
    return {"wall_s": float(wall), "peak_mb": int(kb) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=Path("/tmp/kiln_records"))
    parser.add_argument("--sources", nargs="+", default=["parquet", "webdataset", "folder"],
                        choices=["parquet", "webdataset", "folder"])
    args = parser.parse_args()
    results = {}
    for n in args.sizes:
        root = args.out / str(n)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for kind, source in write_sources(root, n, args.sources).items():
            r = ingest(root, source)
            results[f"{kind} {n}"] = r
            print(f"| {kind} | {n:,} | {r['wall_s']:.1f} | {n / r['wall_s']:,.0f} | "
                  f"{r['peak_mb']:,.0f} |", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
