"""The one definition of how a text becomes model input: the subword tokenizer and the saved
preprocessing (model.json "preprocessing" of a text model), used by augment, train, compress,
evaluate, package and the service alike.

A text is normalised and split by the tokenizer saved beside the model (`tokenizer.json`, the
`tokenizers` library's format), cut to `max_tokens` ids ([CLS] first) and padded with `pad_id`
to the longest text of its batch. The models read one int64 input, `input_ids` (N, L), and
mask padding themselves, so the ONNX graph has that one input.

Needs only numpy and `tokenizers`: the Bento's service tokenizes with it and ships without torch.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from pipeline import StageError

TOKENIZER_FILE = "tokenizer.json"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 of a trained vocabulary
# The architecture of the TF-IDF + logistic-regression baseline served as a model
# (pipeline/modalities/text/scoring.py): its graph tokenizes by itself and reads the texts, raw_texts below,
# not input_ids; the tokenizer.json beside it is the run's, unused.
RAW_TEXT_MODEL = "baseline_tfidf_lr"


def raw_texts(texts: list[str]) -> np.ndarray:
    """Texts as the string tensor [N, 1] a RAW_TEXT_MODEL's graph reads."""
    return np.array(list(texts), dtype=object).reshape(-1, 1)


@dataclass(frozen=True)
class TextPreprocessing:
    """How a text becomes `input_ids`: the tokenizer file beside the model (by its sha256), the
    longest input the model reads, and the ids augmentation and padding use."""
    tokenizer_sha256: str
    max_tokens: int
    lowercase: bool
    pad_id: int
    mask_id: int
    vocab_size: int

    UNIT = "texts"  # what the items are called in counts and messages (not a field)
    MODEL_FILES = (TOKENIZER_FILE,)  # beside the weights in every model folder (not a field)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def load(source: Path | bytes) -> str:
        """One text file (path or bytes: an ingested item) as the model reads it: decoded as
        UTF-8 (validate has checked that an ingested one decodes)."""
        return (source if isinstance(source, bytes) else Path(source).read_bytes()).decode("utf-8")


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int,
                    lowercase: bool) -> Tokenizer:
    """A byte-pair-encoding tokenizer (BERT's normaliser and pre-tokenizer) trained on `texts`
    only: texts, or batches (lists) of texts, read once as they come. BPE, not BERT's
    WordPiece: `tokenizers` 0.23's WordPiece and Unigram trainers break ties in hash-map order,
    so the same texts gave a different vocabulary on every run (huggingface/tokenizers#1794), and
    so a different model after every `dvc repro`; its BPE trainer gave the same tokenizer.json in
    3 processes x 3 runs (docs/benchmarks.md, Text)."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True,
                                                      handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls = tokenizer.token_to_id("[CLS]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A",
                                                             special_tokens=[("[CLS]", cls)])
    return tokenizer


def save(tokenizer: Tokenizer, folder: Path, max_tokens: int, lowercase: bool) -> TextPreprocessing:
    """Write folder/tokenizer.json; return the preprocessing that names it."""
    path = Path(folder) / TOKENIZER_FILE
    tokenizer.save(str(path))
    return TextPreprocessing(
        tokenizer_sha256=hashlib.sha256(path.read_bytes()).hexdigest(), max_tokens=max_tokens,
        lowercase=lowercase, pad_id=_id(tokenizer, "[PAD]"), mask_id=_id(tokenizer, "[MASK]"),
        vocab_size=tokenizer.get_vocab_size())


def load(folder: Path, prep: TextPreprocessing) -> Tokenizer:
    """folder/tokenizer.json, checked against the sha256 the preprocessing records."""
    path = Path(folder) / TOKENIZER_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StageError(f"{path}: missing (a text model's tokenizer)") from None
    if hashlib.sha256(data).hexdigest() != prep.tokenizer_sha256:
        raise StageError(f"{path}: sha256 does not match the model card's tokenizer_sha256")
    return Tokenizer.from_str(data.decode("utf-8"))


def encode(tokenizer: Tokenizer, texts: list[str], prep: TextPreprocessing) -> np.ndarray:
    """Texts -> int64 `input_ids` (N, L): each cut to prep.max_tokens ids, padded with
    prep.pad_id to the longest of the batch (L >= 1)."""
    rows = [e.ids[:prep.max_tokens] for e in tokenizer.encode_batch(list(texts))]
    ids = np.full((len(rows), max((len(r) for r in rows), default=1) or 1), prep.pad_id,
                  dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids


def _id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise StageError(f"tokenizer has no {token} token")
    return found


RECORD = TextPreprocessing  # the modality seam's `preprocess` part (pipeline/core/modality.py)
