"""Text augmentation, the `augment` part of the modality seam (pipeline/core/modality.py Augment):
the tokenizer, the encoded training split and its augmented copies, on token ids.

Each copy applies, per training text and in this order, random deletion, adjacent swap and
masking at text.augment's rates (each a share of the text's own tokens), drawn from one
generator seeded by text.augment.seed, over the whole (N, L) tensor at once. Position 0 ([CLS])
and padding are never touched; deletion shifts the rest left and pads the end, and keeps at
least one token after [CLS].

Output (data/augmented, the issue-12 contract):
    train.safetensors    tokens int64 (N, L), originals first, then the copies; labels int64 (N,)
    tokenizer.json       BPE trained on the train split only (text.preprocess.vocab_size), or the
                         text.preprocess.pretrained checkpoint's own tokenizer
    preprocessing.json   TextPreprocessing.to_dict()
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from pipeline import StageError
from pipeline.core.dataset import load_texts
from pipeline.modalities.text.config import Augment, Preprocess
from pipeline.params import Params
from pipeline.modalities.text import preprocess as tokens


def _editable(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Bool (N, L): the positions augmentation may change (not [CLS] at 0, not padding)."""
    editable = ids != pad_id
    editable[:, 0] = False
    return editable


def delete(ids: torch.Tensor, rate: float, pad_id: int, g: torch.Generator) -> torch.Tensor:
    editable = _editable(ids, pad_id)
    drop = editable & (torch.rand(ids.shape, generator=g) < rate)
    # A text that would lose every token keeps them all: an empty text carries no label signal.
    drop &= (drop.sum(1) < editable.sum(1)).unsqueeze(1)
    # Stable sort on "dropped" moves the kept tokens left in their order, dropped ones to the end.
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
    kept = ids.gather(1, order)
    return kept.masked_fill(drop.sum(1, keepdim=True) > torch.arange(ids.shape[1]).flip(0),
                            pad_id)


def swap(ids: torch.Tensor, rate: float, pad_id: int, g: torch.Generator) -> torch.Tensor:
    editable = _editable(ids, pad_id)
    pairable = editable[:, :-1] & editable[:, 1:]  # position i swaps with i + 1
    start = pairable & (torch.rand(pairable.shape, generator=g) < rate)
    # A pair may not overlap the previous one (i and i + 1 both chosen): drop the later one.
    start[:, 1:] &= ~start[:, :-1]
    source = torch.arange(ids.shape[1]).repeat(len(ids), 1)
    source[:, :-1] += start.long()
    source[:, 1:] -= start.long()
    return ids.gather(1, source)


def mask(ids: torch.Tensor, rate: float, pad_id: int, mask_id: int,
         g: torch.Generator) -> torch.Tensor:
    chosen = _editable(ids, pad_id) & (torch.rand(ids.shape, generator=g) < rate)
    return ids.masked_fill(chosen, mask_id)


def augment_ids(ids: torch.Tensor, p: Augment, pad_id: int,
                mask_id: int) -> torch.Tensor:
    """int64 (N, L) ids -> (N * (1 + p.copies), L): the originals, then p.copies augmented
    copies, the same for the same p.seed."""
    g = torch.Generator().manual_seed(p.seed)
    copies = [ids]
    for _ in range(p.copies):
        out = delete(ids, p.deletion, pad_id, g)
        out = swap(out, p.swap, pad_id, g)
        copies.append(mask(out, p.mask, pad_id, mask_id, g))
    return torch.cat(copies)


def tokenizer_for(texts: list[str], p: Preprocess) -> Tokenizer:
    """The text.preprocess.pretrained checkpoint's own tokenizer.json, else BPE trained on `texts`."""
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
    """Tokenizer, encoded and augmented train split and preprocessing into `out`; a summary."""
    p, augment = params.text.preprocess, params.text.augment
    texts, labels = load_texts(data, "train")
    out.mkdir(parents=True, exist_ok=True)
    prep = tokens.save(tokenizer_for(texts, p), out, p.max_tokens, p.lowercase)
    tokenizer = tokens.load(out, prep)
    ids = torch.from_numpy(tokens.encode(tokenizer, texts, prep))
    # The model reads text.preprocess.max_tokens tokens of a text; say how many texts lose their end.
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    cut = sum(n > p.max_tokens for n in lengths)
    all_ids = augment_ids(ids, augment, prep.pad_id, prep.mask_id)
    save_file({"tokens": all_ids.contiguous(),
               "labels": torch.from_numpy(labels).repeat(augment.copies + 1).contiguous()},
              out / "train.safetensors")
    (out / "preprocessing.json").write_text(json.dumps(prep.to_dict(), indent=1) + "\n")
    return (f"{len(texts)} training texts -> {len(all_ids)}, {tuple(all_ids.shape)} token ids, "
            f"vocabulary {prep.vocab_size}; {cut} texts ({cut / len(texts):.1%}) cut at "
            f"text.preprocess.max_tokens {p.max_tokens} (longest {max(lengths)} tokens)")

