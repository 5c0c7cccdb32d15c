"""What the ingest and validate stages compare and count in a text, defined once.

    text_key    sha256 of the text in Unicode NFKC, case-folded, whitespace collapsed: two texts
                with one key are the same text (duplicates, leakage between splits)
    words       words and punctuation marks as BERT splits them (its normaliser: control
                characters removed, each CJK ideograph its own word, lower case; then its
                pre-tokenizer: whitespace and punctuation), for length bounds, length drift and
                the vocabulary out-of-vocabulary drift compares against
"""
from __future__ import annotations

import hashlib
import unicodedata

from tokenizers import normalizers, pre_tokenizers

# strip_accents False: accents tell languages apart (português, português).
_NORMALISER = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                         strip_accents=False, lowercase=True)
_PRE_TOKENIZER = pre_tokenizers.BertPreTokenizer()


def text_key(text: str) -> str:
    normal = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha256(normal.encode("utf-8", "surrogatepass")).hexdigest()


def words(text: str) -> list[str]:
    return [w for w, _ in _PRE_TOKENIZER.pre_tokenize_str(_NORMALISER.normalize_str(text))]
