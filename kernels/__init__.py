"""Compute kernels: the ops of a forward step behind one interface, in backends chosen once
per model (:mod:`gpupool.kernels.backend`): the torch reference that is the spec
(:mod:`~gpupool.kernels.reference`), Triton on CUDA, native C on CPU
(:mod:`~gpupool.kernels.native`).

``GPUPOOL_KERNELS=reference`` (the engine's ``kernels`` setting, read in gpupool.config)
makes every model take the reference; ``triton`` Triton (on CPU only useful with
``TRITON_INTERPRET=1``). No setting here is process-wide.
"""

from __future__ import annotations

from gpupool.kernels.backend import triton_available

__all__ = ["triton_available"]
