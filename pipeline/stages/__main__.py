"""`python -m pipeline.stages <stage> [args]`: the entry every dvc.yaml stage calls."""
import importlib
import sys

from pipeline import StageError
from pipeline.core import executor
# load_params checks params.yaml's registry names with it, imported there by name (the Bento reads
# cards with pipeline/params.py and has no torch): imported here too, so that every stage's deps
# hold it and the registries' modules (pipeline/core/import_closure.py).
from pipeline.core import registry  # noqa: F401 (load_params runs it)
from pipeline.params import ParamsError, load_params

STAGES = ("ingest", "validate", "augment", "train", "compress", "evaluate", "package")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(f"usage: python -m pipeline.stages {{{','.join(STAGES)}}} [args]", file=sys.stderr)
        return 2
    stage = sys.argv[1]
    try:
        # the whole file, registry names included, before the stage's imports
        executor.start(load_params().engine)
        importlib.import_module(f"pipeline.stages.{stage}").main(sys.argv[2:])
    except (StageError, ParamsError) as e:
        print(f"kiln {stage}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
