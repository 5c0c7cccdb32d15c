"""Text augmentation, the `augment` part of the modality seam (pipeline/core/modality.py Augment):
the tokenizer, and how training sees the texts, on token ids.

The augment stage writes, from the train split (read a batch at a time):
    tokenizer.json       BPE trained on the train split only (text.preprocess.vocab_size), or the
                         text.preprocess.pretrained checkpoint's own tokenizer
    preprocessing.json   TextPreprocessing.to_dict()
Training sees each text 1 + text.augment.copies times an epoch (Views): itself and `copies`
augmented copies. A copy applies, in this order, random deletion, adjacent swap and masking at
text.augment's rates (each a share of the text's own tokens), each position's draws taken from
the text's id, text.augment.seed, the epoch and the view (pipeline/core/stream.py item_draws), on
the device that holds the texts. Position 0 ([CLS]) and padding are never touched; deletion
shifts the rest left and pads the end, and keeps at least one token after [CLS].
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from pipeline import StageError
from pipeline.core.dataset import read_text, split_items
from pipeline.core.stream import item_draws
from pipeline.modalities.text import preprocess as tokens
from pipeline.modalities.text.config import Augment, Preprocess
from pipeline.modalities.text.preprocess import TextPreprocessing
from pipeline.params import Params

# Texts viewed per draw: a view's draws are 3 x max_tokens float64 a text plus their uint64
# temporaries, ~6 MB each at 4,096 texts of 64 tokens; a window of 55,000 texts at once held
# ~85 MB each (the train stage peaked 2.3x higher at 200k texts than at 10k). The same views:
# a text's draws depend on its key alone.
DRAW_ROWS = 4096

BATCH = 8192  # train texts held at once while the tokenizer is trained and the texts measured


def _editable(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Bool (N, L): the positions augmentation may change (not [CLS] at 0, not padding)."""
    editable = ids != pad_id
    editable[:, 0] = False
    return editable


def delete(ids: torch.Tensor, rate: float, pad_id: int, u: torch.Tensor) -> torch.Tensor:
    """Drop each editable token whose uniform in `u` (N, L) is under `rate`."""
    editable = _editable(ids, pad_id)
    drop = editable & (u < rate)
    # A text that would lose every token keeps them all: an empty text carries no label signal.
    drop &= (drop.sum(1) < editable.sum(1)).unsqueeze(1)
    # Stable sort on "dropped" moves the kept tokens left in their order, dropped ones to the end.
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
    kept = ids.gather(1, order)
    return kept.masked_fill(
        drop.sum(1, keepdim=True) > torch.arange(ids.shape[1], device=ids.device).flip(0), pad_id)


def swap(ids: torch.Tensor, rate: float, pad_id: int, u: torch.Tensor) -> torch.Tensor:
    """Swap token i with i + 1 where both are editable and i's uniform in `u` (N, L) is under
    `rate`."""
    editable = _editable(ids, pad_id)
    pairable = editable[:, :-1] & editable[:, 1:]  # position i swaps with i + 1
    start = pairable & (u[:, :-1] < rate)
    # A pair may not overlap the previous one (i and i + 1 both chosen): drop the later one.
    start[:, 1:] &= ~start[:, :-1]
    source = torch.arange(ids.shape[1], device=ids.device).repeat(len(ids), 1)
    source[:, :-1] += start.long()
    source[:, 1:] -= start.long()
    return ids.gather(1, source)


def mask(ids: torch.Tensor, rate: float, pad_id: int, mask_id: int,
         u: torch.Tensor) -> torch.Tensor:
    """Replace each editable token whose uniform in `u` (N, L) is under `rate` by mask_id."""
    chosen = _editable(ids, pad_id) & (u < rate)
    return ids.masked_fill(chosen, mask_id)


@dataclass(frozen=True)
class Views:
    """The text Augmenter (pipeline/core/modality.py): int64 (N, prep.max_tokens) token ids,
    encoded by the tokenizer in `folder`, augmented into views; model input cut to the batch's
    longest text."""
    prep: TextPreprocessing
    p: Augment
    folder: Path  # holds prep's tokenizer.json (data/augmented, or a model folder)

    @property
    def views(self) -> int:
        return 1 + self.p.copies

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return tokens.load(self.folder, self.prep)

    def decode(self, data: list[bytes]) -> np.ndarray:
        """Padded to prep.max_tokens, not to the longest of `data`: every call's items have one
        shape, so windows decoded apart stack into one batch."""
        ids = tokens.encode(self.tokenizer, [self.prep.load(item) for item in data], self.prep)
        out = np.full((len(ids), self.prep.max_tokens), self.prep.pad_id, dtype=np.int64)
        out[:, :ids.shape[1]] = ids
        return out

    def view(self, items: torch.Tensor, keys: np.ndarray, epoch: int, view: int) -> torch.Tensor:
        if view == 0:
            return items
        return torch.cat([self._view(items[i:i + DRAW_ROWS], keys[i:i + DRAW_ROWS], epoch, view)
                          for i in range(0, len(items), DRAW_ROWS)])

    def _view(self, items: torch.Tensor, keys: np.ndarray, epoch: int, view: int) -> torch.Tensor:
        n, length = items.shape
        # Three draws per position (deletion, swap, mask), interleaved: a position's draws are
        # the same whatever the length the batch is padded to.
        u = torch.from_numpy(item_draws(keys, (self.p.seed, epoch, view), 3 * length)
                             ).view(n, length, 3).to(items.device, torch.float32)
        out = delete(items, self.p.deletion, self.prep.pad_id, u[..., 0])
        out = swap(out, self.p.swap, self.prep.pad_id, u[..., 1])
        return mask(out, self.p.mask, self.prep.pad_id, self.prep.mask_id, u[..., 2])

    def to_input(self, items: torch.Tensor) -> torch.Tensor:
        """Cut to the batch's longest text, as a served batch is padded: a split of short texts
        costs what its texts do, not prep.max_tokens each."""
        used = (items != self.prep.pad_id).any(0).nonzero()
        return items[:, :int(used.max()) + 1] if len(used) else items


def augmenter(params: Params, prep: TextPreprocessing, folder: Path) -> Views:
    return Views(prep, params.text.augment, Path(folder))


def tokenizer_for(texts: Iterable[list[str]], p: Preprocess) -> Tokenizer:
    """The text.preprocess.pretrained checkpoint's own tokenizer.json, else BPE trained on
    `texts` (batches of texts, read only here)."""
    if p.pretrained is None:
        return tokens.train_tokenizer(texts, p.vocab_size, p.lowercase)
    path = Path(p.pretrained) / tokens.TOKENIZER_FILE
    if not path.is_file():
        raise StageError(f"text.preprocess.pretrained: {path} not found (a Hugging Face checkpoint folder "
                         "with its tokenizer.json)")
    tokenizer = Tokenizer.from_file(str(path))
    # encode() cuts and pads itself; a checkpoint's own padding/truncation settings would differ.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def write_augmented(data: Path, out: Path, params: Params) -> str:
    """Tokenizer and preprocessing of the train split of `data` into `out`; a summary."""
    p, augment = params.text.preprocess, params.text.augment
    train = split_items(data, "train", read_text, "texts")

    def texts() -> Iterator[list[str]]:
        return (batch for batch, _ in train.batches(BATCH))

    out.mkdir(parents=True, exist_ok=True)
    prep = tokens.save(tokenizer_for(texts(), p), out, p.max_tokens, p.lowercase)
    tokenizer = tokens.load(out, prep)
    # The model reads text.preprocess.max_tokens tokens of a text; say how many texts lose their end.
    cut = longest = 0
    for batch in texts():
        lengths = [len(e.ids) for e in tokenizer.encode_batch(batch)]
        cut += sum(n > p.max_tokens for n in lengths)
        longest = max(longest, *lengths)
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    n = len(train)
    return (f"{n} training texts, vocabulary {prep.vocab_size}; {cut} texts ({cut / n:.1%}) cut "
            f"at text.preprocess.max_tokens {p.max_tokens} (longest {longest} tokens); training "
            f"sees each text and {augment.copies} augmented copies per epoch")
