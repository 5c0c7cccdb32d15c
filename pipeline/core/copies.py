"""Copies across the whole data set, which every modality's checks find the same way: items are
the same when their content_hash is (each modality's hash says what "the same" means: decoded
pixels, normalised text, decoded samples), and an id is given twice when two rows carry it.

Validate describes the data set a shard at a time and keeps, per item, a 128-bit key of its
content and of its id (KEY, ID: two uint64 columns each, 32 bytes an item, 32 MB a million), so
copies in different shards and splits meet without the items' strings in memory: pandas groups
the keys by hash. Two different items share a 128-bit key with odds of about n^2 / 2^129
(1e-27 at a million).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

KEY = ["content_hi", "content_lo"]  # the content_hash's key
ID = ["id_hi", "id_lo"]             # the item id's key


def keys(values: Iterable[object]) -> np.ndarray:
    """(n, 2) uint64: the first 128 bits of BLAKE2b of each value's text (None: of "None")."""
    digests = b"".join(hashlib.blake2b(str(v).encode(), digest_size=16).digest() for v in values)
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 2)


def copies(table: pd.DataFrame, among: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(leak, duplicate) of each row of `table` (columns split and KEY), counting only the rows
    `among` marks (items that decode and are not blank or silent: such items are alike by
    nature, and their own check reports them); the other rows get False. leak: the item's
    content is in more than one split; duplicate: in its split more than once."""
    hashed = table.loc[among, [*KEY, "split"]]
    splits = hashed.groupby(KEY, observed=True).split.transform("nunique")
    leak = (splits > 1).reindex(table.index, fill_value=False)
    duplicate = hashed.duplicated([*KEY, "split"], keep=False).reindex(table.index,
                                                                       fill_value=False)
    return leak, duplicate


def repeated(table: pd.DataFrame) -> pd.Series:
    """Whether each row's id (the ID key) is another row's too."""
    return table.duplicated(ID, keep=False)
