"""Memory kinds, selected by `model.memory.kind`. Each kind is one module implementing `MemoryKind`."""

from __future__ import annotations

import importlib

from memscale.models.memory.base import LayerMemory, MemoryKind, MemoryState

# name -> "module:Class"; imported lazily so that a kind's optional dependencies cost nothing to the others.
REGISTRY: dict[str, str] = {
    "none": "memscale.models.memory.none:NoMemory",
    "rmt": "memscale.models.memory.rmt:RecurrentMemory",
    "xl": "memscale.models.memory.xl:TransformerXLMemory",
    "memformer": "memscale.models.memory.memformer:MemformerMemory",
    "lamemo": "memscale.models.memory.lamemo:LookAheadMemory",
    "infinity": "memscale.models.memory.infinity:InfinityMemory",
    "armt": "memscale.models.memory.armt:AssociativeMemory",
}


def build_memory(cfg, *, segment_len: int, layers: range | None = None) -> MemoryKind:
    """Build the memory kind named by `cfg.memory.kind` for a model config `cfg` (for `layers` of it)."""
    name = cfg.memory.kind
    if name not in REGISTRY:
        raise ValueError(f"model.memory.kind={name!r} is not available: choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    kind_cls = getattr(importlib.import_module(module), cls)
    return kind_cls(
        d_model=cfg.d_model,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        segment_len=segment_len,
        cfg=cfg.memory,
        layers=layers,
        dropout=cfg.dropout,
        attention=cfg.attention,
    )


__all__ = ["LayerMemory", "MemoryKind", "MemoryState", "build_memory", "REGISTRY"]
