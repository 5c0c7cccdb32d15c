"""The validate stage's text part (data.modality text): the texts table, its Great Expectations
checks, the data profile and drift features. pipeline/stages/validate.py runs them with the checks every
modality shares (manifest, classes, PSI/KS drift) and reports failures the same way (GX report,
Data Docs, one line per failed kind).

    texts    one row per ingested item: path, source, label, split; file_problem (why the file
             is not text: unreadable, binary (NUL bytes), not UTF-8) and decode_error (where);
             then of the decoded text: empty (nothing but whitespace), words and chars (code
             points), content_hash (pipeline/modalities/text/words.py text_key: NFKC, case-folded,
             whitespace collapsed), and alike (compared for copies: not empty); validate
             adds leak, duplicate and repeated over the whole data set
             (pipeline/core/copies.py)

Drift compares the new train split with the champion's profile: label shares (PSI), the words
per text (PSI and KS, as quantiles like image statistics: pipeline/core/drift.py), and the share of
the train split's words (occurrences) missing from the champion's vocabulary (the profile keeps
its text.validate.profile_words most frequent words): its rise over the champion's own share (its words
beyond the stored vocabulary) against text.validate.oov_warn / text.validate.oov_fail. The drift metrics carry
that share as a note, which validate and the flow's run summary print.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.checks import Checks, Data, file_problems, showing
from pipeline.core.copies import KEY
from pipeline.core.drift import PROFILE_QUANTILES, PROFILE_VERSION, DriftReport, compare, counted
from pipeline.core.dataset import described_table
from pipeline.params import DriftParams, Params
from pipeline.modalities.text.words import text_key, words

COLUMNS = ["path", "source", "label", "split", "file_problem", "decode_error", "empty", "words",
           "chars", "content_hash"]
SUMMARY = ("texts", "classes", "splits", "undecodable", "empty", "duplicates", "checks_passed",
           "checks_failed", "success")
# Every key of validate's metrics for texts, in the order the details JSON holds them.
METRICS = ("texts", "classes", "splits", "undecodable", "empty", "duplicates", "words",
           "checks_passed", "checks_failed", "problems", "file_problems", "drift", "success")
FILE_PROBLEMS = ("binary data", "not UTF-8")
# The columns validate keeps of every text for the data-set checks, metrics and profile; FLAGS:
# the rows the data-set checks name besides copies (none)
MERGED = ("file_problem", "empty", "words")
FLAGS = ()
SAME = "compared in Unicode NFKC, case-folded, whitespace collapsed"  # as content_hash is
CHECKS = Checks()  # the texts table's own checks (pipeline/core/checks.py has the shared ones)


def describe_text(data: bytes) -> tuple[dict, list[str] | None]:
    """(row fields, the text's words) of one ingested text; words None when it is no text."""
    nul = data.find(b"\0")
    if nul >= 0:  # never in text; in binary files and UTF-16/32
        return {"file_problem": "binary data",
                "decode_error": f"NUL byte at offset {nul} of {len(data)} bytes"}, None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return {"file_problem": "not UTF-8",
                "decode_error": f"byte {data[e.start]:#04x} at offset {e.start}: {e.reason}"}, None
    found = words(text)
    empty = not text.strip()
    return {"file_problem": None, "decode_error": None, "empty": empty,
            # empty texts are the empty check's finding, not the length bounds'
            "words": None if empty else len(found), "chars": len(text),
            "content_hash": None if empty else text_key(text)}, found


def shard_table(shard: Path, params: Params) -> tuple[pd.DataFrame, Counter]:
    """One row per item of a shard file, row flags included; and the word occurrences of its
    train texts (empty ones and files that are no text have none)."""
    train_words = Counter()

    def count(row: dict, found: Counter) -> None:
        if row["split"] == "train" and found:
            train_words.update(found)

    texts = described_table(shard, describe_text, COLUMNS, extra=count).astype(
        {"words": float, "chars": float})
    texts["empty"] = texts["empty"].fillna(False).astype(bool)
    texts["alike"] = texts.content_hash.notna()
    return texts, train_words


def conclude(table: pd.DataFrame, extras: list[Counter], params: Params,
             reference: dict | None) -> tuple[dict, TextDrift | None]:
    """The profile of the data set's train split (the texts table and each shard's train words)
    and that split's drift from `reference`."""
    train_words = Counter()
    for shard_words in extras:
        train_words.update(shard_words)
    current = profile(table, train_words, params.text.validate.profile_words)
    report = compare_texts(reference, current, train_words, params.drift) \
        if reference is not None else None
    return current, report


@CHECKS.check("unreadable_texts", "not a UTF-8 text file", name=file_problems)
def decodes(E, d: Data):
    return E.ExpectColumnValuesToBeNull(
        column="file_problem",
        description="Every file is text that decodes as UTF-8: readable, no binary data "
                    "(NUL bytes), no bytes that are not UTF-8.")


def _sources(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    source = dict(zip(table.path, table.source))
    return [source[r["path"]] for r in res["unexpected_index_list"]]


@CHECKS.check("empty_texts", "empty text", name=_sources)
def not_empty(E, d: Data):
    return E.ExpectColumnValuesToBeInSet(column="empty", value_set=[False],
                                         description="No text is empty or only whitespace.")


@CHECKS.check("text_length", "text length out of bounds", name=showing("{words:.0f} words"))
def length(E, d: Data):
    rules = d.params.text.validate
    return E.ExpectColumnValuesToBeBetween(
        column="words", min_value=rules.min_words, max_value=rules.max_words,
        description=f"Every text has {rules.min_words} to {rules.max_words} words and "
                    "punctuation marks (params text.validate.min_words, text.validate.max_words).")


def metrics(table: pd.DataFrame, params: Params) -> dict:
    """What validate's metrics hold for texts besides the shared counts."""
    decoded = table[table.file_problem.isna()]
    return {
        "texts": len(table),
        "undecodable": int(table.file_problem.notna().sum()),
        "empty": int(decoded["empty"].sum()),
        "duplicates": int(decoded[~decoded["empty"]].duplicated(KEY).sum()),
        "file_problems": {p.replace(" ", "_").replace("-", "_"):
                          int((table.file_problem == p).sum()) for p in FILE_PROBLEMS},
        "words": {q: float(decoded.words.quantile(v)) if decoded.words.notna().any() else None
                  for q, v in (("min", 0), ("median", 0.5), ("max", 1))},
    }


def lines(metrics: dict, params: Params) -> list[str]:
    """What validate prints besides its summary: nothing more for texts."""
    return []


# ---- drift ---------------------------------------------------------------------------------

def profile(texts: pd.DataFrame, counts: Counter, vocabulary_size: int) -> dict:
    """Reference statistics of the train split's texts (pipeline/core/drift.py's layout, plus the
    `vocabulary_size` most frequent of the words `counts` counts and their own out-of-vocabulary
    rate)."""
    train = (texts.split == "train") & texts.words.notna()
    vocabulary = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                  [:vocabulary_size]]
    lengths = texts.words[train].to_numpy(float)
    return {
        "version": PROFILE_VERSION,
        "modality": "text",
        "texts": int(train.sum()),
        "categorical": {"label": counted(texts.label[train])},
        "quantiles": {"words": np.quantile(lengths, np.linspace(0, 1, PROFILE_QUANTILES),
                                           method="inverted_cdf").round(4).tolist()
                      if len(lengths) else []},
        "vocabulary": vocabulary,
        "oov_rate": oov_rate(vocabulary, counts),
    }


def oov_rate(vocabulary: list[str], counts: Counter) -> float:
    """Share of the word occurrences in `counts` whose word is not in `vocabulary`."""
    total = sum(counts.values())
    known = set(vocabulary)
    return round(sum(n for w, n in counts.items() if w not in known) / total, 4) if total else 0.0


@dataclass(frozen=True)
class TextDrift:
    """Drift of texts: the PSI/KS report of pipeline/core/drift.py and the out-of-vocabulary rate."""
    report: DriftReport
    oov_rate: float            # the new train split's words missing from the champion's vocabulary
    reference_oov_rate: float  # the champion's own train split against its stored vocabulary

    def table(self) -> pd.DataFrame:
        rise = round(self.oov_rate - self.reference_oov_rate, 4)
        rows = self.report.table().assign(oov_rise=np.nan)
        return pd.concat([rows, pd.DataFrame([{"feature": "vocabulary", "psi": np.nan,
                                               "ks": np.nan, "oov_rise": rise}])],
                         ignore_index=True)

    def metrics(self, warned: bool, failed: bool) -> dict:
        """The PSI/KS report's metrics, the out-of-vocabulary rates, and the sentence on them
        that validate and the run summary show (`notes`)."""
        return {**self.report.metrics(warned, failed),
                "oov": {"rate": self.oov_rate, "champion_rate": self.reference_oov_rate},
                "notes": [f"Out-of-vocabulary words: {self.oov_rate:.1%} of the new train split, "
                          f"{self.reference_oov_rate:.1%} of the champion's own."]}


def compare_texts(reference: dict, current: dict, counts: Counter, thresholds: DriftParams
                  ) -> TextDrift:
    """Score the current train split (`current`, its profile, and `counts`, its words) against
    the champion's profile `reference`."""
    report = compare(reference, current, thresholds, categorical=("label",),
                     continuous=("words",))
    return TextDrift(report, oov_rate(reference["vocabulary"], counts), reference["oov_rate"])


def _oov(res: dict, table: pd.DataFrame, column: str | None) -> list[str]:
    return [f"out-of-vocabulary share up {r[column]:.3f}" for r in res["unexpected_index_list"]]


def _oov_rule(bound: float, key: str) -> str:
    return (f"The share of the train split's words missing from the champion's vocabulary "
            f"exceeds the champion's own by at most {bound} (params {key}")


@CHECKS.check("vocabulary_drift", "drift from the champion's vocabulary", table="drift",
              name=_oov)
def vocabulary(E, d: Data):
    bound = d.params.text.validate.oov_fail
    return E.ExpectColumnValuesToBeBetween(
        column="oov_rise", max_value=bound,
        description=_oov_rule(bound, "text.validate.oov_fail") + ").")


@CHECKS.check("vocabulary_drift_warning", "vocabulary drift warning", table="drift",
              fatal=False, name=_oov)
def vocabulary_warning(E, d: Data):
    bound = d.params.text.validate.oov_warn
    return E.ExpectColumnValuesToBeBetween(
        column="oov_rise", max_value=bound,
        description=_oov_rule(bound, "text.validate.oov_warn") + "; a warning only).")
