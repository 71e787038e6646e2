"""Converters from other implementations' checkpoints to cmn bundles (``cmn-convert``)."""

from cmn.convert.r2gencmn import Converted, ReferenceCheckpoint, convert, read_reference_checkpoint

__all__ = ["Converted", "ReferenceCheckpoint", "convert", "read_reference_checkpoint"]
