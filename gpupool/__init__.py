"""gpupool: serve many fine-tuned LLMs from one shared pool of accelerators."""

from gpupool.adapters.base import AdapterError
from gpupool.config import AdapterConfig, Config, PoolConfig, SchedulerConfig
from gpupool.llm import Engine
from gpupool.models.errors import ModelLoadError
from gpupool.messages.params import SamplingParams
from gpupool.scheduler.request import RequestError, RequestOutput
from gpupool.scheduler.slo import SLO

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "Config",
    "Engine",
    "ModelLoadError",
    "PoolConfig",
    "RequestError",
    "RequestOutput",
    "SLO",
    "SamplingParams",
    "SchedulerConfig",
]
