"""One stage again in the projects bench/scale_bench.py kept (OUT/<size>/project), with this
checkout's pipeline/ copied in: `dvc repro --single-item <stage>` (its code changed, so it
reruns on the data the earlier stages left), peak RSS summed over the stage's processes by
scale_bench's sampler. For a before/after of one stage without regenerating and re-running the
stages before it.

    python bench/restage.py OUT STAGE SIZE [SIZE ...]
    python bench/restage.py /tmp/kscale24 validate 10000 1000000
"""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_bench import REPO, measured  # noqa: E402


def main() -> None:
    root, stage, sizes = sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]]
    for n in sizes:
        work = Path(root) / str(n) / "project"
        shutil.rmtree(work / "pipeline")
        shutil.copytree(REPO / "pipeline", work / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__"))
        m = measured(work, stage)
        print(f"| {n:,} | {stage} | {m['wall_s']} | {n / m['wall_s']:,.0f} | {m['peak_mb']:,} |",
              flush=True)
        print(m["log"][-700:], flush=True)


if __name__ == "__main__":
    main()
