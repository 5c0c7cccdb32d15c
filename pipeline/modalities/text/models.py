"""The text model registry MODELS (text.train.model in params.yaml), the text.preprocess.pretrained wrapper, and
the text side of training: the `models` part of the modality seam (pipeline/core/modality.py
Models).

Every model takes one input, int64 `input_ids` (N, L) with 1 <= L <= max_tokens, padded with
pad_id, masks the padding itself and returns float logits (N, classes): the ONNX signature of
the issue-12 contract.

    text_encoder  BERT-style: token + position embeddings, text.train.layers pre-LN transformer layers
                  (text.train.dim wide, text.train.heads heads, text.train.ffn FFN units), mean of the non-padding
                  positions, a linear classifier. Attention is plain nn.Linear q/k/v/out, so
                  Torch-Pruning removes whole heads (pipeline/core/pruning.py passes `num_heads`)
                  and FFN units, and the graph exports to ONNX with dynamic N and L.
    text_bag      mean of the non-padding token embeddings (text.train.dim wide) and a linear layer:
                  the fast baseline.
    pretrained    a local Hugging Face checkpoint (text.preprocess.pretrained), loaded with transformers'
                  AutoModelForSequenceClassification; nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline import StageError
from pipeline.core.card import ModelCard
from pipeline.core.registry import Registry
from pipeline.core.modality import FitRecipe, fit_recipe
from pipeline.modalities.text.config import Recipe, Train
from pipeline.params import Params
from pipeline.modalities.text.preprocess import TextPreprocessing

PRETRAINED = "pretrained"  # the card's architecture for a text.preprocess.pretrained model
HF_CONFIG = "config.json"  # beside a pretrained model's weights: rebuilds it without the checkpoint


def _padding_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where keep (N, L) is true: (N, L, D) -> (N, D)."""
    weights = keep.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_bias: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = (proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + pad_bias
        attended = self.dropout(scores.softmax(-1)) @ v
        # -1: after head pruning the width is num_heads * head_dim, no longer dim.
        return self.out(attended.transpose(1, 2).reshape(n, length, -1))


class EncoderLayer(nn.Module):
    """Pre-LN: x + attention(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), pad_bias))
        return x + self.dropout(self.ffn(self.norm2(x)))


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, max_tokens: int, pad_id: int, classes: int, dim: int,
                 layers: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_tokens, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = input_ids != self.pad_id
        # Padding keys get -1e9 before the softmax (exp underflows to 0); [CLS] is never padding,
        # so every row has a key to attend to.
        pad_bias = (~keep).to(torch.float32)[:, None, None, :] * -1e9
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        for layer in self.layers:
            x = layer(x, pad_bias)
        return self.classifier(_padding_mean(self.norm(x), keep))

    def pruning_spec(self) -> tuple[list[nn.Module], dict[nn.Module, int]]:
        """For Torch-Pruning: the layers whose outputs must keep their width (the residual
        stream is written by the embeddings, attention outputs and FFN outputs: ignoring them
        leaves text.train.dim alone; the classifier's width is the class count), and the heads of
        each q/k/v projection, so whole heads are removed from all three together."""
        ignored = [self.tokens, self.positions, self.classifier]
        heads: dict[nn.Module, int] = {}
        for layer in self.layers:
            ignored += [layer.attention.out, layer.ffn[2]]
            for proj in (layer.attention.q, layer.attention.k, layer.attention.v):
                heads[proj] = layer.attention.num_heads
        return ignored, heads

    def pruned(self, num_heads: dict[nn.Module, int]) -> None:
        """After Torch-Pruning: record each attention's new head count (its projections are
        narrower; head_dim is unchanged)."""
        for layer in self.layers:
            layer.attention.num_heads = num_heads[layer.attention.q]


class TextBag(nn.Module):
    def __init__(self, vocab_size: int, pad_id: int, classes: int, dim: int):
        super().__init__()
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(_padding_mean(self.tokens(input_ids), input_ids != self.pad_id))

    def pruning_spec(self) -> tuple[list[nn.Module], dict[nn.Module, int]]:
        """Embedding dimensions are pruned (and the classifier's inputs with them)."""
        return [self.classifier], {}


MODELS: Registry[Callable[..., nn.Module]] = Registry("text.train.model")


@MODELS.register
def text_encoder(prep: TextPreprocessing, classes: int, p: Train) -> nn.Module:
    return TextEncoder(prep.vocab_size, prep.max_tokens, prep.pad_id, classes, p.dim, p.layers,
                       p.heads, p.ffn, p.dropout)


@MODELS.register
def text_bag(prep: TextPreprocessing, classes: int, p: Train) -> nn.Module:
    return TextBag(prep.vocab_size, prep.pad_id, classes, p.dim)


class Pretrained(nn.Module):
    """A Hugging Face sequence classifier that takes input_ids only (the mask is input_ids !=
    pad_id) and returns logits: the same signature as the registry's models."""

    def __init__(self, hf: nn.Module, pad_id: int):
        super().__init__()
        self.hf, self.pad_id = hf, pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long()).logits

    def _attentions(self) -> list[nn.Module]:
        """BERT-family self-attentions (query/key/value projections, num_attention_heads)."""
        return [m for m in self.hf.modules()
                if all(hasattr(m, a) for a in ("query", "key", "value", "num_attention_heads"))]

    def pruning_spec(self) -> tuple[list[nn.Module], dict[nn.Module, int]]:
        """As TextEncoder's, for a BERT-family checkpoint: the embeddings and every linear layer
        that writes the hidden size (attention and FFN outputs, the pooler) keep their width,
        and so does the classifier; heads are removed whole from query, key and value."""
        hidden = self.hf.config.hidden_size
        heads = {proj: m.num_attention_heads for m in self._attentions()
                 for proj in (m.query, m.key, m.value)}
        linears = [m for m in self.hf.modules() if isinstance(m, nn.Linear)]
        ignored = [m for m in self.hf.modules() if isinstance(m, nn.Embedding)]
        ignored += [m for m in linears if m.out_features == hidden and m not in heads]
        return ignored + [linears[-1]], heads

    def pruned(self, num_heads: dict[nn.Module, int]) -> None:
        for m in self._attentions():
            m.num_attention_heads = num_heads[m.query]
            m.all_head_size = m.query.out_features


def _hf_offline() -> None:
    # Nothing is downloaded: a missing file is an error, never a hub request.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_pretrained(folder: Path, prep: TextPreprocessing, classes: int) -> Pretrained:
    """The checkpoint in `folder` with a fresh `classes`-way head (its own head if it already
    has that many labels)."""
    _hf_offline()
    from transformers import AutoModelForSequenceClassification

    try:
        hf = AutoModelForSequenceClassification.from_pretrained(
            str(folder), local_files_only=True, num_labels=classes, ignore_mismatched_sizes=True,
            attn_implementation="eager")  # plain ops: exports to ONNX, prunes like ours
    except (OSError, ValueError) as e:
        raise StageError(f"text.preprocess.pretrained: cannot load a Hugging Face checkpoint from {folder}: "
                         f"{e}") from None
    return Pretrained(hf, prep.pad_id)


def build(name: str, prep: TextPreprocessing, classes: int, s: Recipe) -> nn.Module:
    """The text.preprocess.pretrained checkpoint of `s` (text's params section, or the recipe a
    card records), else the registry's model `name` (trained from scratch) of s.train's sizes."""
    if s.preprocess.pretrained is not None:
        return load_pretrained(Path(s.preprocess.pretrained), prep, classes)
    return MODELS.get(name)(prep, classes, s.train)


# --- the Models part ---------------------------------------------------------------------------

def recipe(params: Params) -> FitRecipe:
    """text.train's budget, lr and batch size; no channels_last (token ids are (N, L)) and no
    CUDA graphs (only measured with the image and audio models: docs/benchmarks.md, GPU)."""
    own = params.text.train
    return fit_recipe(params.train, own, channels_last=False, cuda_graph=False)


def torch_threads(params: Params) -> int | None:
    return params.text.train.threads


def create(params: Params, prep: TextPreprocessing, classes: int) -> nn.Module:
    return build(params.text.train.model, prep, classes, params.text)


def architecture(params: Params) -> str:
    """The registry name, or PRETRAINED."""
    return PRETRAINED if params.text.preprocess.pretrained is not None else params.text.train.model


def model_files(model: nn.Module) -> dict[str, bytes]:
    """A pretrained model's config as HF_CONFIG: rebuilds it without the checkpoint."""
    if not isinstance(model, Pretrained):
        return {}
    return {HF_CONFIG: json.dumps(model.hf.config.to_dict(), indent=1).encode()}


def rebuild(card: ModelCard, model_dir: Path) -> nn.Module:
    """A pretrained model from the HF_CONFIG beside its weights, without its original
    checkpoint folder."""
    prep = card.preprocessing
    if card.architecture != PRETRAINED:
        return build(card.architecture, prep, len(card.classes), card.recipe.section)
    _hf_offline()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**json.loads((model_dir / HF_CONFIG).read_text()))
    config._attn_implementation = "eager"
    return Pretrained(AutoModelForSequenceClassification.from_config(config), prep.pad_id)
