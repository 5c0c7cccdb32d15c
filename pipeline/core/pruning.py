"""The pruning methods compress.prune_method names (the compress stage prunes with them), in one
registry, PRUNERS. Every method is called as method(model, amount, example): `model` pruned in
place by the `amount` fraction, `example` one input batch; it returns {layer name: (output width
before, after)} for the layers that shrank. Two kinds:
  structured (marked `@structured`) really remove channels/units with Torch-Pruning: it traces
      the model's dependency graph on `example`, so layers tied together (a producer and its
      readers, batch norms, a residual sum's inputs) shrink as one group. The model really has
      fewer MACs and parameters, so the ONNX file is smaller and faster.
  mask methods only zero weights (torch.nn.utils.prune masks): shapes stay (they return {}), so
      the pruned file is as large and as fast as the float one unless compressed on disk.
      compress.json says so (macs and params unchanged) rather than claiming a saving.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from pipeline.core.registry import Registry

Pruner = Callable[[nn.Module, float, torch.Tensor], dict[str, tuple[int, int]]]
PRUNERS: Registry[Pruner] = Registry("compress.prune_method")
# The convolutions pruning, widths and sparsity count: an audio Conv1D network's too.
CONVS = (nn.Conv1d, nn.Conv2d)


def structured(pruner: Pruner) -> Pruner:
    """Marks a method that rebuilds layers smaller (compress.json: prune_kind "structured")."""
    pruner.structured = True
    return pruner


def is_structured(name: str) -> bool:
    """Whether the registered method `name` removes channels/units rather than masking weights."""
    return getattr(PRUNERS.get(name), "structured", False)


def prunable(model: nn.Module) -> list[nn.Module]:
    """The layers whose weights the mask methods zero and sparsity counts."""
    return [m for m in model.modules() if isinstance(m, (*CONVS, nn.Linear))]


@PRUNERS.register
@structured
def structured_l1(model: nn.Module, amount: float, example: torch.Tensor
                  ) -> dict[str, tuple[int, int]]:
    """Remove the `amount` fraction of channels (conv) and units (hidden linear) of every
    dependency group, ranked by the group's L1 weight magnitude (Torch-Pruning traces the graph
    on `example`, one input batch); the logits layer keeps its width. Channels tied by a residual
    sum form one group and are removed together from every layer that writes or reads them.
    A model with a `pruning_spec()` (the text models) names its own fixed-width layers and
    its attention heads per q/k/v projection: the `amount` fraction of each attention's heads
    is removed whole, by the L1 of the head's q/k/v rows and output columns, and the model's
    `pruned(num_heads)` records the new head counts."""
    kinds = (*CONVS, nn.Linear, nn.Embedding)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    before = {name: m.weight.shape[0 if not isinstance(m, nn.Embedding) else 1]
              for name, m in layers.items()}
    if hasattr(model, "pruning_spec"):
        ignored, num_heads = model.pruning_spec()
    else:
        logits = [m for m in layers.values() if not isinstance(m, nn.Embedding)][-1]
        ignored, num_heads = [logits], {}  # the logits layer's width is the class count
    # The dependency graph is traced through autograd: no torch.no_grad() here.
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=amount, ignored_layers=ignored,
                                  root_module_types=list(kinds), num_heads=num_heads,
                                  prune_num_heads=bool(num_heads), prune_head_dims=False,
                                  head_pruning_ratio=amount)
    pruner.step()
    if num_heads:
        model.pruned(pruner.num_heads)
    after = {name: m.weight.shape[0 if not isinstance(m, nn.Embedding) else 1]
             for name, m in layers.items()}
    return {name: (before[name], after[name]) for name in layers if after[name] != before[name]}


@PRUNERS.register
def l1_unstructured(model: nn.Module, amount: float, example: torch.Tensor
                    ) -> dict[str, tuple[int, int]]:
    """Zero the `amount` fraction of smallest-magnitude weights, ranked across all layers."""
    prune.global_unstructured([(m, "weight") for m in prunable(model)],
                              pruning_method=prune.L1Unstructured, amount=amount)
    return {}


@PRUNERS.register
def l1_channels(model: nn.Module, amount: float, example: torch.Tensor
                ) -> dict[str, tuple[int, int]]:
    """Zero the `amount` fraction of each conv layer's output channels with the smallest L1 norm."""
    for m in prunable(model):
        if isinstance(m, CONVS):
            prune.ln_structured(m, "weight", amount=amount, n=1, dim=0)
    return {}
