"""Memory the engine owns: flat weight buffers, the KV page pool and (later) the arena."""

from gpupool.pool.kv import KVStorage, PagePool
from gpupool.pool.weights import TensorSpec, WeightLayout

__all__ = ["KVStorage", "PagePool", "TensorSpec", "WeightLayout"]
