"""Model code: visual extractor, memory, Transformer and the full CMN."""

from cmn.model.cmn import CMN, build_model

__all__ = ["CMN", "build_model"]
