"""The leak and duplicate flags of an item table, which every modality's checks part computes
the same way: items are the same when their content_hash is (each modality's hash says what
"the same" means: decoded pixels, normalised text, decoded samples)."""
from __future__ import annotations

import pandas as pd


def copies(table: pd.DataFrame, among: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(leak, duplicate) of each row of `table` (columns path, split, content_hash), counting
    only the rows `among` marks (items that decode and are not blank or silent: such items are
    alike by nature, and their own check reports them); the other rows get False. leak: the
    item's content is in more than one split; duplicate: in its split more than once."""
    hashed = table[among]
    splits = hashed.groupby("content_hash").split.nunique()
    in_split = hashed.groupby(["split", "content_hash"]).path.transform("size")
    leak = (table.content_hash.map(splits).fillna(0) > 1) & among
    duplicate = in_split.reindex(table.index).fillna(0) > 1
    return leak, duplicate
