"""What training keeps in memory between the forward and the backward, measured exactly.

``saved_activation_bytes`` counts, with ``torch.autograd.graph.saved_tensors_hooks``, the bytes
of every distinct storage autograd saves for the backward while a function runs (parameters
excluded: they are model state, not activations). It is exact on any device, so a CPU measures
what a GPU would keep for the same model, shapes and attention path. ``dv3 plan`` is checked
against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.utils.checkpoint import checkpoint

from engine.config import EncoderConfig
from engine.model.encoder import Encoder


def saved_activation_bytes(run: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output
    return sum(seen.values())


def layer_activation_bytes(config: EncoderConfig, batch: int, length: int, recompute: bool,
                           dtype: torch.dtype = torch.float32) -> int:
    """Saved bytes of one encoder layer's forward over ``batch`` sequences of ``length`` tokens
    (training mode, dropout as configured), with or without activation checkpointing."""
    encoder = Encoder(config).to(dtype).train()
    layer = encoder.layer[0]
    hidden = torch.randn(batch, length, config.hidden_size, dtype=dtype, requires_grad=True)
    relative = encoder.relative_embeddings(hidden.device).detach().requires_grad_(True)
    if recompute:
        def run():
            return checkpoint(layer, hidden, None, relative, use_reentrant=False)
    else:
        def run():
            return layer(hidden, None, relative)
    return saved_activation_bytes(run, exclude=list(layer.parameters()))
