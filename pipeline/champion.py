"""Champion lines: which model serves each task, the champions before it, rollback, the drift
reference, and the Bento a clone of the project shares through DVC.

A task is a model name (params.yaml package.model_name) with a class list: a data set with other
classes is another task with its own line, so it is never drift-checked against, or scored
against, another task's champion. A line is one JSON record in the BentoML home,
$BENTOML_HOME/kiln/champions/<task>.json: the champion (model and Bento tags, test accuracy, the
model's sha256) and the champions before it, oldest first. Only the package stage promotes, and
only after infra validation; `rollback` makes the previous champion the champion again. The
Bento pins its model by full tag (pipeline/service.py), so switching the Bento switches the model.

Kill safety: the package stage writes the tags it is about to create into a journal
($BENTOML_HOME/kiln/pending.json) before it creates them and clears it once they are promoted or
deleted. A run killed in between leaves the journal; the next run deletes those tags (unless a
line names them) before it does anything else. Records are replaced atomically (write, rename).

The champion pointer (reports/champion.json in dvc.yaml) is what DVC sees of a line, which lives
outside the workspace: the task and its champion's model and Bento tags, nothing else (no time),
so it is the same bytes in every clone with the same champion and changes exactly when the
champion does. The validate stage depends on it, so a promotion or a rollback reruns validate
(drift against the new champion) and nothing after it. Whatever reads or changes the line writes
it: validate (the champion it found, none in a fresh clone's empty store), package, rollback and
the import below.

`python -m pipeline.champion bento --report R --export E` prints the Bento tag `make serve`
serves: the champion of the task named in R (the package stage's report); when this BentoML home
has no champion for it (a fresh clone after `dvc pull`), the Bento folder E that the package
stage exported is imported first and becomes the champion. `... rollback --report R` rolls the
task back. Both take `--champion P`, the pointer to bring up to date.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline import StageError
from pipeline.params import ParamsError, typed

# Before bentoml is imported (it reads these at import): keep its store inside the project and
# stop its usage tracking, also when a stage runs through `dvc repro` without make.
os.environ.setdefault("BENTOML_HOME", str(Path(__file__).resolve().parent.parent / ".bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
from bentoml.exceptions import NotFound  # noqa: E402

REFERENCE_FILE = "reference.json"  # the validate stage's data profile, inside the BentoML model


@dataclass(frozen=True)
class Task:
    model_name: str      # params.yaml package.model_name
    classes: list[str]

    @property
    def key(self) -> str:
        """<model name>-<8 hex of the class list's sha256>: a file name and a BentoML label."""
        digest = hashlib.sha256(json.dumps(self.classes, ensure_ascii=False).encode()).hexdigest()
        return f"{self.model_name}-{digest[:8]}"


@dataclass(frozen=True)
class Champion:
    model_tag: str
    bento_tag: str
    accuracy: float          # test accuracy when it was promoted
    weights_sha256: str      # of its model.onnx
    promoted_at: str         # UTC, ISO 8601


@dataclass(frozen=True)
class Line:
    task: Task
    champion: Champion | None
    previous: list[Champion]  # oldest first


def kiln_home() -> Path:
    return Path(os.environ["BENTOML_HOME"]) / "kiln"


def _line_path(task: Task) -> Path:
    return kiln_home() / "champions" / f"{task.key}.json"


def _write_json(path: Path, data) -> None:
    """Write then rename: a crash never leaves half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)


def _read_line_file(path: Path) -> Line:
    try:
        return typed(json.loads(path.read_text(encoding="utf-8")), Line, "line")
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: champion record is not valid JSON ({e})") from None
    except ParamsError as e:
        raise StageError(f"{path}: champion record: {e}") from None


def read_line(task: Task) -> Line:
    """The task's line; an empty one when it has no champion yet."""
    path = _line_path(task)
    if not path.exists():
        return Line(task=task, champion=None, previous=[])
    line = _read_line_file(path)
    if line.task != task:
        raise StageError(f"{path}: champion record is for {line.task}, not {task}")
    return line


def write_line(line: Line) -> None:
    _write_json(_line_path(line.task), dataclasses.asdict(line))


def promote(line: Line, new: Champion) -> Line:
    """The line with `new` as champion and the old champion appended to the previous ones."""
    previous = line.previous + ([line.champion] if line.champion else [])
    promoted = Line(task=line.task, champion=new, previous=previous)
    write_line(promoted)
    return promoted


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rollback(task: Task) -> Champion:
    """Make the previous champion the champion again and return it. The rolled-back one leaves
    the line (its Bento and model stay in the store)."""
    line = read_line(task)
    if not line.previous:
        raise StageError(f"{_line_path(task)}: no previous champion to roll back to")
    restored = line.previous[-1]
    try:
        bentoml.bentos.get(restored.bento_tag)
    except NotFound:
        raise StageError(f"previous champion's Bento {restored.bento_tag} is no longer in the "
                         f"store {os.environ['BENTOML_HOME']}; nothing changed") from None
    write_line(Line(task=task, champion=restored, previous=line.previous[:-1]))
    return restored


def write_pointer(path: Path, task: Task) -> None:
    """The champion pointer at `path` (see the module doc) from the task's line."""
    champion = read_line(task).champion
    _write_json(path, {"task": task.key,
                       "model_tag": champion.model_tag if champion else None,
                       "bento_tag": champion.bento_tag if champion else None})


# ---- kill safety ---------------------------------------------------------------------------

def _journal() -> Path:
    return kiln_home() / "pending.json"


def begin(model_tag: str, bento_tag: str) -> None:
    """Record the tags a package run is about to create (see the module doc)."""
    _write_json(_journal(), {"model_tag": model_tag, "bento_tag": bento_tag})


def end() -> None:
    _journal().unlink(missing_ok=True)


def named_tags() -> set[str]:
    """Every model and Bento tag that some line names (champion or previous)."""
    tags = set()
    for path in (kiln_home() / "champions").glob("*.json"):
        line = _read_line_file(path)
        for c in ([line.champion] if line.champion else []) + line.previous:
            tags.update((c.model_tag, c.bento_tag))
    return tags


def clean_up_killed_run() -> list[str]:
    """Delete what a killed package run left (its journal's tags that no line names); return the
    deleted tags."""
    if not _journal().exists():
        return []
    pending = json.loads(_journal().read_text(encoding="utf-8"))
    keep, deleted = named_tags(), []
    for delete, tag in ((bentoml.bentos.delete, pending["bento_tag"]),
                        (bentoml.models.delete, pending["model_tag"])):
        if tag not in keep:
            try:
                delete(tag)
                deleted.append(tag)
            except NotFound:
                pass
    end()
    return deleted


# ---- drift reference -------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    model_tag: str | None
    profile: dict | None   # pipeline/drift.py's data profile of the champion's training data
    note: str              # why there is none, for the log


def reference(task: Task) -> Reference:
    """The data profile stored with the task's champion, if there is one and it carries one."""
    champion = read_line(task).champion
    if champion is None:
        return Reference(None, None, f"no champion of task {task.key} in the BentoML store at "
                                     f"{os.environ['BENTOML_HOME']} yet (first run of this model "
                                     "name and class list)")
    path = Path(bentoml.models.get(champion.model_tag).path_of(REFERENCE_FILE))
    if not path.is_file():
        return Reference(champion.model_tag, None,
                         f"champion {champion.model_tag} was packaged without {REFERENCE_FILE}")
    return Reference(champion.model_tag, json.loads(path.read_text(encoding="utf-8")), "")


# ---- the Bento shared through DVC ------------------------------------------------------------

def export_bento(bento_tag: str, folder: Path) -> None:
    """The Bento with its models, as a folder (BentoML's "folder" export) at `folder`: filled
    beside it, then renamed into place."""
    partial = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    # An absolute path: BentoML's filesystem layer reads a relative one from the root.
    bentoml.bentos.export_bento(bento_tag, str(partial.resolve()), output_format="folder")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def import_bento(folder: Path) -> str:
    """Import an exported Bento folder (and its models) into the store; return its tag."""
    try:
        bento = bentoml.bentos.get(bentoml.bentos.Bento.from_path(str(folder)).tag)
    except NotFound:
        bento = bentoml.bentos.import_bento(str(folder.resolve()), input_format="folder")
    return str(bento.tag)


def read_report(report: Path) -> tuple[Task, dict]:
    """The task and the champion named by the package stage's report."""
    try:
        packaged = json.loads(report.read_text(encoding="utf-8"))
        return typed(packaged["task"], Task, "task"), packaged["champion"]
    except FileNotFoundError:
        raise StageError(f"{report}: not found; run the pipeline (`make run`) or `dvc pull`") from None
    except (json.JSONDecodeError, KeyError, TypeError, ParamsError) as e:
        raise StageError(f"{report}: not a package report ({e})") from None


def bento_to_serve(report: Path, export: Path) -> str:
    """The Bento tag `make serve` serves (see the module doc)."""
    task, shared = read_report(report)
    line = read_line(task)
    if line.champion is None:
        if not (export / "bento.yaml").is_file():
            raise StageError(f"no champion of task {task.key} in {os.environ['BENTOML_HOME']} "
                             f"and no exported Bento at {export}; run `dvc pull` or the pipeline")
        tag = import_bento(export)
        if tag != shared["bento_tag"]:
            raise StageError(f"{export}: holds Bento {tag}, but {report} names "
                             f"{shared['bento_tag']}; run `dvc checkout` or `dvc pull`")
        line = promote(line, Champion(**{**shared, "promoted_at": now()}))
        print(f"imported {tag} from {export} as the champion of {task.key}", file=sys.stderr)
    try:
        bentoml.bentos.get(line.champion.bento_tag)
    except NotFound:
        raise StageError(f"champion Bento {line.champion.bento_tag} of task {task.key} is missing "
                         f"from {os.environ['BENTOML_HOME']}") from None
    return line.champion.bento_tag


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.champion")
    commands = parser.add_subparsers(dest="command", required=True)
    bento = commands.add_parser("bento", help="print the champion's Bento tag (for make serve)")
    bento.add_argument("--report", type=Path, required=True, help="the package stage's report")
    bento.add_argument("--export", type=Path, required=True, help="the exported Bento folder")
    back = commands.add_parser("rollback", help="make the previous champion the champion again")
    back.add_argument("--report", type=Path, required=True, help="the package stage's report")
    for command in (bento, back):
        command.add_argument("--champion", type=Path,
                             help="the champion pointer to write (validate's dep in dvc.yaml)")
    args = parser.parse_args(argv)
    task, _ = read_report(args.report)
    if args.command == "bento":
        tag = bento_to_serve(args.report, args.export)
        if args.champion:
            write_pointer(args.champion, task)
        print(tag)
        return
    restored = rollback(task)
    if args.champion:
        write_pointer(args.champion, task)
    print(f"rolled back task {task.key}: champion is {restored.model_tag} (Bento "
          f"{restored.bento_tag}, test accuracy {restored.accuracy:.4f})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except StageError as e:
        print(f"kiln champion: error: {e}", file=sys.stderr)
        sys.exit(1)
