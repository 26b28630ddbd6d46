from memscale.models.transformer import IGNORE_INDEX, MemoryTransformer, SegmentOutput

__all__ = ["IGNORE_INDEX", "MemoryTransformer", "SegmentOutput"]
