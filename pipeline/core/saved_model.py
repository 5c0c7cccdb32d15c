"""A saved model of any modality, rebuilt from its folder: the card names the modality, whose
`models` part (pipeline/core/modality.py) rebuilds the architecture; the weights are checked against
the card's sha256 and loaded here. Train, compress, evaluate and the benchmarks load models this
way."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from pipeline.core.card import ModelCard, read_card
from pipeline.core.modality import card_part


def load(model_dir: Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild a saved model from its card (model_dir/model.json) and the one safetensors
    weights file the card lists, checked against its sha256 first; in eval mode."""
    card = read_card(model_dir)
    model = card_part(card, "models").rebuild(card, model_dir)
    (weights,) = card.weights
    model.load_state_dict(load_file(model_dir / weights))
    return model.eval(), card
