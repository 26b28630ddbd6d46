"""The control: no memory; each segment sees only itself."""

from memscale.models.memory.base import MemoryKind


class NoMemory(MemoryKind):
    kind = "none"
