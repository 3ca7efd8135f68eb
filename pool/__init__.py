"""Memory the engine owns: the arena, flat weight buffers, the KV page pool and its bytes.

``pages`` is pure Python (integer bookkeeping); the other modules hold tensors. Nothing is
imported here, so ``import gpupool.pool.pages`` never loads torch.
"""
