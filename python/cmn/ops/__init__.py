"""Tensor ops: fused and reference implementations of memory querying."""

from cmn.ops._ref import memory_query_ref
from cmn.ops._torch import memory_query_torch
from cmn.ops.memory_query import IMPLS, memory_query, resolve_impl

__all__ = ["IMPLS", "memory_query", "memory_query_ref", "memory_query_torch", "resolve_impl"]
