"""The champion: which model serves each task, the champions before it, rollback, the drift
reference, and the Bentos a clone shares through DVC.

A task is a model name (params.yaml package.model_name) with a class list: a data set with other
classes is another task with its own line, so it is never drift-checked against, or scored
against, another task's champion.

Where the champion lives: in the workspace, as DVC and git see it, not in a global store.
- The champion record (reports/champion.json, committed with dvc.lock): per task, its champion
  (model and Bento tags, test accuracy, the sha256 of its model.onnx), the champions before it
  (oldest first) and the models rolled back from, which are never promoted again; and which
  task the last package run served (`make serve` serves that one). No times: the same
  champions give the same bytes in every clone.
- The exported Bentos (models/champion/, a DVC output): one folder per Bento the record names
  (BentoML's folder export, models inside) and beside each its manifest, the sha256 of every
  file in `sha256sum` format (`sha256sum -c kiln-<version>.sha256` in that folder checks it).
Both are the package stage's `persist: true` outputs: DVC does not delete them before the stage
runs, so a killed or failed package run leaves the champion serving. The stage writes a new
Bento's folder and manifest first and the record last, by write-and-rename: the record is the
commit point; folders that no line names are removed after it.

The BentoML store ($BENTOML_HOME) is a cache that follows the workspace: `make serve` imports
the champion the record names after checking every file against its manifest (no symlink, no
path out of the folder, no file the manifest does not list), and the package stage builds its
challenger's Bento there. So a promotion belongs to the workspace that ran it, like any output:
a queued or temp-workspace experiment's promotion lives in that experiment's commit until
`dvc exp apply` (or a merge) brings it into the workspace, and `git checkout` + `dvc checkout`
of another revision brings that revision's champion. GTO (which ships with DVC) is not used:
its promotions are git tags, global to the repository, so a package stage inside a queued
experiment that assigned one would change production for every workspace, and a stage must not
write git refs.

Kill safety in the store: the package stage writes the tags it is about to create into a
journal ($BENTOML_HOME/kiln/pending.json) before it creates them and clears it once they are
promoted or deleted; the next run deletes what a killed run left (unless the record names it).

`python -m pipeline.lifecycle.champion bento --champion R --export E` prints the Bento tag `make serve`
serves (imported into the store first when missing); `... rollback --champion R --export E`
makes the previous champion the champion again.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline import StageError
from pipeline.core.card import sha256_file
from pipeline.params import ParamsError, typed

# Before bentoml is imported (it reads these at import): keep its store inside the project and
# stop its usage tracking, also when a stage runs through `dvc repro` without make.
os.environ.setdefault("BENTOML_HOME", str(Path(__file__).resolve().parents[2] / ".bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import bentoml  # noqa: E402
from bentoml.exceptions import NotFound  # noqa: E402

REFERENCE_FILE = "reference.json"  # the validate stage's data profile, inside the BentoML model
RECORD_VERSION = 2  # 1: the lines lived in the BentoML store (before issue 22)


@dataclass(frozen=True)
class Task:
    model_name: str      # params.yaml package.model_name
    classes: list[str]

    @property
    def key(self) -> str:
        """<model name>-<8 hex of the class list's sha256>."""
        digest = hashlib.sha256(json.dumps(self.classes, ensure_ascii=False).encode()).hexdigest()
        return f"{self.model_name}-{digest[:8]}"


@dataclass(frozen=True)
class Champion:
    model_tag: str
    bento_tag: str
    accuracy: float          # test accuracy when it was promoted
    weights_sha256: str      # of its model.onnx


@dataclass(frozen=True)
class Line:
    task: Task
    champion: Champion | None
    previous: list[Champion]  # oldest first
    retired: list[str]        # model tags rolled back from: the package stage never promotes them


@dataclass(frozen=True)
class Record:
    version: int
    serves: str | None        # the key of the task the last package run (or rollback) served
    lines: dict[str, Line]    # task key -> its line

    def line(self, task: Task) -> Line:
        line = self.lines.get(task.key)
        if line is None:
            return Line(task=task, champion=None, previous=[], retired=[])
        if line.task != task:
            raise StageError(f"champion record: line {task.key} is for {line.task}, not {task}")
        return line

    def served_line(self, path: Path) -> Line:
        if self.serves is None:
            raise StageError(f"{path}: names no champion yet; run the pipeline (`make run`)")
        return self.lines[self.serves]

    def with_line(self, line: Line) -> Record:
        """This record with `line` put in and served."""
        return Record(RECORD_VERSION, line.task.key, {**self.lines, line.task.key: line})

    def bento_tags(self) -> set[str]:
        return {c.bento_tag for line in self.lines.values()
                for c in ([line.champion] if line.champion else []) + line.previous}

    def tags(self) -> set[str]:
        """Every model and Bento tag the record names."""
        return self.bento_tags() | {c.model_tag for line in self.lines.values()
                                    for c in ([line.champion] if line.champion else []) + line.previous}


EMPTY = Record(RECORD_VERSION, None, {})


def read_record(path: Path) -> Record:
    """The champion record at `path`; an empty one when the file does not exist (no run yet)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return EMPTY
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: champion record is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        raise StageError(f"{path}: not a champion record of version {RECORD_VERSION} (an older "
                         "Kiln kept champions in the BentoML store: delete the file and rerun "
                         "the package stage to start the record)")
    try:
        record = typed(data, Record, "record")
    except ParamsError as e:
        raise StageError(f"{path}: champion record: {e}") from None
    if record.serves is not None and record.serves not in record.lines:
        raise StageError(f"{path}: serves {record.serves!r}, which no line has")
    return record


def write_json(path: Path, data) -> None:
    """Write then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)


def write_record(path: Path, record: Record) -> None:
    write_json(path, dataclasses.asdict(record))


# ---- the exported Bentos and their manifests -----------------------------------------------

def tree_sha256(folder: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file under `folder` but Python's bytecode caches
    (__pycache__: serving a Bento writes them into it where bytecode caching is on, and
    .dvcignore keeps them out of DVC, so a pulled clone has none). Raises StageError naming a
    symbolic link or anything else that is not a regular file or a folder: an exported Bento
    holds regular files only (a link could pull in a file from outside it)."""
    files = {}
    for top, folders, names in os.walk(folder):
        folders[:] = [f for f in folders if f != "__pycache__"]
        for name in folders + names:
            path = Path(top, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise StageError(f"{path}: a symbolic link (to {os.readlink(path)}); a Bento "
                                 "folder must hold regular files only")
            if stat.S_ISREG(mode):
                files[path.relative_to(folder).as_posix()] = sha256_file(path)
            elif not stat.S_ISDIR(mode):
                raise StageError(f"{path}: not a regular file; a Bento folder must hold "
                                 "regular files only")
    return files


def read_manifest(path: Path) -> dict[str, str]:
    """A `sha256sum` manifest: relative path -> sha256. Refuses paths out of the folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise StageError(f"{path}: manifest not found") from None
    except UnicodeDecodeError:
        raise StageError(f"{path}: manifest is not UTF-8") from None
    manifest = {}
    for number, line in enumerate(lines, 1):
        digest, sep, name = line.partition("  ")
        relative = PurePosixPath(name)
        if not sep or len(digest) != 64 or relative.is_absolute() or ".." in relative.parts \
                or not name or name != relative.as_posix():
            raise StageError(f"{path}:{number}: not `<sha256>  <relative path>`: {line[:120]!r}")
        manifest[name] = digest
    return manifest


def check_tree(folder: Path, manifest: dict[str, str], manifest_path: Path) -> None:
    """Raise StageError naming the first file of `folder` that differs from its manifest:
    changed bytes, missing, not listed, a link or not a regular file."""
    found = tree_sha256(folder)
    for name in sorted(manifest.keys() | found.keys()):
        if name not in found:
            raise StageError(f"{folder / name}: missing (listed in {manifest_path})")
        if name not in manifest:
            raise StageError(f"{folder / name}: not listed in {manifest_path}")
        if found[name] != manifest[name]:
            raise StageError(f"{folder / name}: sha256 {found[name]} does not match "
                             f"{manifest[name]} in {manifest_path} (a damaged or altered file)")


def _tag_parts(tag: str) -> tuple[str, str]:
    name, version = str(tag).split(":")
    return name, version


class Exports:
    """The exported Bentos (models/champion): <name>-<version>/ and <name>-<version>.sha256."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, bento_tag: str) -> Path:
        return self.folder / "-".join(_tag_parts(bento_tag))

    def manifest(self, bento_tag: str) -> Path:
        return self.folder / f"{'-'.join(_tag_parts(bento_tag))}.sha256"

    def verified(self, bento_tag: str) -> Path | None:
        """The Bento's exported folder after checking it against its manifest; None when it is
        not here (not pulled). Raises StageError naming a file that does not match."""
        folder = self.path(bento_tag)
        if not folder.exists() and not folder.is_symlink():
            return None
        if folder.is_symlink() or not folder.is_dir():
            raise StageError(f"{folder}: not a folder")
        check_tree(folder, read_manifest(self.manifest(bento_tag)), self.manifest(bento_tag))
        return folder

    def model_folder(self, champion: Champion) -> Path | None:
        """The champion's model folder (model.onnx, model.json, reference.json) inside its
        verified export, else in the store, else None."""
        folder = self.verified(champion.bento_tag)
        if folder is not None:
            return folder.joinpath("models", *_tag_parts(champion.model_tag))
        try:
            return Path(bentoml.models.get(champion.model_tag).path)
        except NotFound:
            return None

    def add(self, bento_tag: str) -> Path:
        """Export the Bento (with its models) from the store: filled beside its place, its
        manifest written, then renamed into place. Running out of space names the cause and
        leaves nothing half-written."""
        folder, partial = self.path(bento_tag), self.folder / f".{self.path(bento_tag).name}.tmp"
        with no_space_left(f"exporting {bento_tag} to {self.folder}", partial):
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            # An absolute path: BentoML's filesystem layer reads a relative one from the root.
            bentoml.bentos.export_bento(bento_tag, str(partial.resolve()), output_format="folder")
            lines = [f"{digest}  {name}" for name, digest in sorted(tree_sha256(partial).items())]
            manifest = self.manifest(bento_tag)
            manifest_partial = manifest.with_name(f".{manifest.name}.tmp")
            manifest_partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
            manifest_partial.replace(manifest)
        return folder

    def prune(self, keep: set[str]) -> None:
        """Remove every folder, manifest or leftover that is not one of the Bentos `keep`."""
        if not self.folder.is_dir():
            return
        wanted = {p.name for tag in keep for p in (self.path(tag), self.manifest(tag))}
        for entry in self.folder.iterdir():
            if entry.name not in wanted:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


@contextlib.contextmanager
def no_space_left(doing: str, *partial: Path):
    """A full disk (ENOSPC, EDQUOT) while `doing`: delete `partial` and raise one StageError
    naming the cause instead of a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        raise StageError(f"no space left on the device while {doing}; nothing was changed: "
                         "free some space and rerun") from None


# ---- the store, a cache of what the workspace names -------------------------------------------

def _store_mismatches(bento_tag: str, manifest: dict[str, str]) -> set[str]:
    """The files of an exported Bento whose store copy is missing or differs: its models live
    in the model store, the rest in the Bento's folder (a model's `latest` pointer is the
    store's own, not compared). Every file when the store has no such Bento."""
    try:
        bento = Path(bentoml.bentos.get(bento_tag).path)
    except NotFound:
        return set(manifest)
    models = Path(os.environ["BENTOML_HOME"]) / "models"
    wrong = set()
    for name, digest in manifest.items():
        parts = PurePosixPath(name).parts
        if parts[0] == "models" and parts[-1] == "latest" and len(parts) == 3:
            continue
        path = models.joinpath(*parts[1:]) if parts[0] == "models" else bento / name
        if path.is_symlink() or not path.is_file() or sha256_file(path) != digest:
            wrong.add(name)
    return wrong


def import_verified(bento_tag: str, exports: Exports) -> None:
    """Make the store's copy of the Bento and its models the verified exported one. Copies
    that differ from the manifest are deleted and imported again, from a private copy of the
    folder checked after it was copied (nothing can change it between check and import)."""
    folder = exports.verified(bento_tag)
    assert folder is not None
    manifest = read_manifest(exports.manifest(bento_tag))
    wrong = _store_mismatches(bento_tag, manifest)
    if not wrong:
        return
    with contextlib.suppress(NotFound):
        bentoml.bentos.delete(bento_tag)
        print(f"kiln: the store's copy of {bento_tag} differed from {folder} "
              f"({sorted(wrong)[0]}, ...): imported again", file=sys.stderr)
    for name, version in {PurePosixPath(n).parts[1:3] for n in wrong if n.startswith("models/")}:
        with contextlib.suppress(NotFound):
            bentoml.models.delete(f"{name}:{version}")
    home = Path(os.environ["BENTOML_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home, prefix=".import-") as tmp, \
            no_space_left(f"importing {bento_tag} into {home}"):
        copy = Path(tmp, "bento")
        shutil.copytree(folder, copy, symlinks=True)
        check_tree(copy, manifest, exports.manifest(bento_tag))
        bentoml.bentos.import_bento(str(copy), input_format="folder")
    if wrong := _store_mismatches(bento_tag, manifest):
        raise StageError(f"{bento_tag}: the store's copy in {home} differs from {folder} after "
                         f"importing it: {sorted(wrong)[:3]}")


def bento_to_serve(record_path: Path, exports: Exports) -> str:
    """The tag of the champion's Bento the record serves, in the store and checked: imported
    from its verified export when the store lacks it or holds another copy; from the store
    alone (its model.onnx checked against the record) when the export is not here."""
    champion = read_record(record_path).served_line(record_path).champion
    assert champion is not None
    if exports.verified(champion.bento_tag) is not None:
        import_verified(champion.bento_tag, exports)
        return champion.bento_tag
    try:
        bentoml.bentos.get(champion.bento_tag)
        stored = Path(bentoml.models.get(champion.model_tag).path) / "model.onnx"
    except NotFound:
        raise StageError(f"champion {champion.bento_tag} named by {record_path} is neither in "
                         f"{exports.folder} nor in the store {os.environ['BENTOML_HOME']}: run "
                         f"`dvc pull {exports.folder}` (or `dvc checkout`)") from None
    if sha256_file(stored) != champion.weights_sha256:
        raise StageError(f"{stored}: sha256 does not match {champion.weights_sha256} named by "
                         f"{record_path}; run `dvc pull {exports.folder}` to restore the champion")
    return champion.bento_tag


def rollback(record_path: Path, exports: Exports) -> Champion:
    """Make the previous champion of the served task the champion again and return it. The
    rolled-back model leaves the line and is retired: the package stage will not promote it
    again. Its export is removed; the restored one's is checked (exported from the store when
    the workspace lacks it)."""
    record = read_record(record_path)
    line = record.served_line(record_path)
    if not line.previous:
        raise StageError(f"{record_path}: task {line.task.key} has no previous champion to roll "
                         "back to")
    restored = line.previous[-1]
    if exports.verified(restored.bento_tag) is None:
        try:
            bentoml.bentos.get(restored.bento_tag)
        except NotFound:
            raise StageError(f"previous champion {restored.bento_tag} is neither in "
                             f"{exports.folder} nor in the store {os.environ['BENTOML_HOME']}; "
                             "nothing changed") from None
        exports.add(restored.bento_tag)
    record = record.with_line(Line(task=line.task, champion=restored, previous=line.previous[:-1],
                                   retired=line.retired + [line.champion.model_tag]))
    write_record(record_path, record)
    exports.prune(record.bento_tags())
    return restored


# ---- kill safety in the store --------------------------------------------------------------

def _journal() -> Path:
    return Path(os.environ["BENTOML_HOME"]) / "kiln" / "pending.json"


def _build_space() -> Path:
    """Where BentoML builds a Bento before it enters the store."""
    return Path(os.environ["BENTOML_HOME"]) / "tmp"


def _build_leftovers(before: list[str]) -> list[Path]:
    space = _build_space()
    return [p for p in space.iterdir() if p.name not in before] if space.is_dir() else []


def begin(model_tag: str, bento_tag: str) -> list[str]:
    """Record the tags a package run is about to create, and what BentoML's build space holds
    now (see the module doc); return the latter."""
    space = _build_space()
    before = sorted(p.name for p in space.iterdir()) if space.is_dir() else []
    write_json(_journal(), {"model_tag": model_tag, "bento_tag": bento_tag, "build_space": before})
    return before


def end() -> None:
    _journal().unlink(missing_ok=True)


def remove_build_leftovers(before: list[str]) -> None:
    """Delete what appeared in BentoML's build space since `before` (a failed or killed build's
    half-built Bento)."""
    for path in _build_leftovers(before):
        shutil.rmtree(path, ignore_errors=True)


def clean_up_killed_run(keep: set[str]) -> list[str]:
    """Delete what a killed package run left in the store (its journal's tags but those in
    `keep`, and its half-built Bento); return the deleted tags."""
    if not _journal().exists():
        return []
    pending = json.loads(_journal().read_text(encoding="utf-8"))
    deleted = []
    for delete, tag in ((bentoml.bentos.delete, pending["bento_tag"]),
                        (bentoml.models.delete, pending["model_tag"])):
        if tag not in keep:
            try:
                delete(tag)
                deleted.append(tag)
            except NotFound:
                pass
    remove_build_leftovers(pending.get("build_space", []))
    end()
    return deleted


# ---- drift reference -------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    model_tag: str | None
    profile: dict | None   # pipeline/core/drift.py's data profile of the champion's training data
    note: str              # why there is none, for the log


def reference(record_path: Path, exports: Exports, task: Task) -> Reference:
    """The data profile stored with the task's champion, as the workspace names it."""
    champion = read_record(record_path).line(task).champion
    if champion is None:
        return Reference(None, None, f"no champion of task {task.key} in {record_path} yet "
                                     "(first run of this model name and class list)")
    folder = exports.model_folder(champion)
    if folder is None:
        return Reference(champion.model_tag, None,
                         f"champion {champion.bento_tag} named by {record_path} is neither in "
                         f"{exports.folder} nor in the BentoML store (`dvc pull` brings it)")
    path = folder / REFERENCE_FILE
    if not path.is_file():
        return Reference(champion.model_tag, None,
                         f"champion {champion.model_tag} was packaged without {REFERENCE_FILE}")
    return Reference(champion.model_tag, json.loads(path.read_text(encoding="utf-8")), "")


# ---- command line --------------------------------------------------------------------------

def rollback_in_dvc(record_path: Path, exports: Exports, stage: str) -> tuple[Champion, str]:
    """rollback(); when DVC called `stage` (the package stage, whose outputs the record and the
    exports are) up to date before it, its new outputs are recorded in dvc.lock (`dvc commit`),
    so `dvc status` stays clean. Returns the restored champion and what to tell about DVC."""
    from dvc.repo import Repo

    with Repo() as repo:
        clean = not repo.status(targets=[stage])
    restored = rollback(record_path, exports)
    if not clean:
        return restored, f"the {stage} stage was not up to date before: run `dvc repro`"
    with Repo() as repo:
        repo.commit(stage, force=True)
    return restored, "dvc.lock records it"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.lifecycle.champion")
    commands = parser.add_subparsers(dest="command", required=True)
    bento = commands.add_parser("bento", help="print the champion's Bento tag (for make serve), "
                                              "imported into the store after checking it")
    back = commands.add_parser("rollback", help="make the previous champion the champion again")
    back.add_argument("--stage", help="the dvc.yaml stage whose outputs these are (package): "
                                      "committed to dvc.lock when it was up to date")
    for command in (bento, back):
        command.add_argument("--champion", type=Path, required=True,
                             help="the champion record (the package stage's --champion)")
        command.add_argument("--export", type=Path, required=True,
                             help="the exported Bentos (the package stage's --export)")
    args = parser.parse_args(argv)
    exports = Exports(args.export)
    if args.command == "bento":
        print(bento_to_serve(args.champion, exports))
        return
    if args.stage:
        champion, dvc_note = rollback_in_dvc(args.champion, exports, args.stage)
    else:
        champion, dvc_note = rollback(args.champion, exports), ""
    print(f"rolled back: champion is {champion.model_tag} (Bento {champion.bento_tag}, test "
          f"accuracy {champion.accuracy:.4f}); `make serve` serves it"
          + (f"; {dvc_note}" if dvc_note else "")
          + f". Commit {args.champion} (and dvc.lock) to make it the champion for every clone.")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except StageError as e:
        print(f"kiln champion: error: {e}", file=sys.stderr)
        sys.exit(1)
