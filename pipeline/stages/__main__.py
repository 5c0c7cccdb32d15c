"""`python -m pipeline.stages <stage> [args]`: the entry every dvc.yaml stage calls."""
import importlib
import sys

from pipeline import StageError
from pipeline.core import executor
from pipeline.params import ParamsError, load_params

STAGES = ("ingest", "validate", "augment", "train", "compress", "evaluate", "package")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(f"usage: python -m pipeline.stages {{{','.join(STAGES)}}} [args]", file=sys.stderr)
        return 2
    stage = sys.argv[1]
    try:
        # the whole file, registry names included (read, not imported: no torch), before the
        # stage's imports
        executor.start(load_params().engine)
        importlib.import_module(f"pipeline.stages.{stage}").main(sys.argv[2:])
    except (StageError, ParamsError) as e:
        print(f"kiln {stage}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
