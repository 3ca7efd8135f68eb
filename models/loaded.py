"""One loaded model: config, tokenizer, flat weights bound to the forward pass, KV view."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gpupool.adapters.base import AdapterConfig, AdapterError
from gpupool.adapters.batch import LoraBatch
from gpupool.adapters.paged import AdapterPages, PieceLayout, target_groups
from gpupool.kernels import backend, native
from gpupool.models import tp as tp_shard
from gpupool.models.batch import BatchRow, ForwardBatch
from gpupool.models.config import ModelConfig
from gpupool.models.cpu import auto_cpu_dtype
from gpupool.models.errors import ModelLoadError
from gpupool.models.graphs import DecodeGraphs
from gpupool.models.llama import LlamaModel, kv_views
from gpupool.models.loader import check_quantization, load_flat_weights
from gpupool.models.runner import build_batch
from gpupool.models.tokenizer import eos_token_ids, load_tokenizer
from gpupool.pool.kv import KVStorage

logger = logging.getLogger(__name__)


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device,
                  cpu_flags=None, bf16_gemv: bool | None = None):
    """``auto``: on CPU bf16 where the CPU computes it natively (avx512_bf16 or AMX, probed
    at run time; ``cpu_flags`` injected in tests) or has AVX2 + FMA and the native bf16 GEMV
    built (``bf16_gemv``: injected in tests, else asked of the kernels, which this builds),
    else float32; on a GPU the model's own 16-bit dtype. float32 is the one that is
    token-exact with transformers in fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            if bf16_gemv is None:
                bf16_gemv = native.has_gemv()
            dtype = auto_cpu_dtype(cpu_flags, bf16_gemv)
        else:
            return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
                cfg.torch_dtype, torch.bfloat16
            )
    try:
        return {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        choices = "auto, float32, float16 or bfloat16"
        raise ValueError(f"dtype must be {choices}, not {dtype!r}") from None


# a CPU model resident for this many steps gets its weights packed for oneDNN (LlamaModel.
# pack_weights: about 100 ms for SmolLM2 in bf16 here, won back within ~10 decode steps);
# a model swapped in for a few tokens never pays it
PACK_AFTER_STEPS = 16


class LoadedModel:
    def __init__(self, name: str, folder: str | Path, device: torch.device, kv: KVStorage,
                 dtype: str | torch.dtype = "auto", adapters: AdapterConfig | None = None,
                 weight_pool=None, tokenizer: bool = True, quantization: str | None = None,
                 cuda_graphs: bool = False, kernels: str = "auto", use_native: bool = True,
                 batch_invariant: bool = True, tp=None):
        """With ``weight_pool`` (a :class:`gpupool.pool.residency.WeightPool`) the weights live
        in the host cache and are copied into an arena slab when the model runs; without it
        they are copied to the device once and stay. Adapters live in pages of ``kv``'s pool
        (adapters/paged.py).
        ``quantization="int8"`` stores the linear layers and the lm_head as int8 with one scale
        per output row (the rest, activations and adapters stay in ``dtype``). ``kernels``,
        ``use_native``, ``batch_invariant``: the engine's kernel settings, from which the
        model's backend is chosen once (kernels.backend.select). ``tp``: the engine's other
        tensor-parallel ranks (``engine/tp.py``'s TPRanks): this process holds rank 0's
        shard (``models/tp.py``; ``cfg`` stays the whole model's, ``model.cfg`` is the
        shard's) and each step is sent to the others first."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: model folder does not exist")
        self.name = name
        self.folder = folder
        self.cfg = ModelConfig.from_folder(folder)
        self.device = device
        self.dtype = resolve_dtype(dtype, self.cfg, device,
                                   bf16_gemv=None if use_native else False)
        # LoRA pieces: float32 on CPU for 16-bit models (the adapters' small products run 2-4x
        # faster in fp32 there: 1-8 rows x 576 x 48 took 18-25 us in bf16, 4-11 us in fp32,
        # measured on an avx512_bf16 CPU; and the LoRA terms are then computed in fp32); the
        # model's dtype elsewhere (the Triton kernels accumulate in fp32 anyway)
        self.adapter_dtype = (torch.float32 if device.type == "cpu"
                              and self.dtype in (torch.bfloat16, torch.float16) else self.dtype)
        self.quantization = check_quantization(quantization)
        # a cluster worker has no text side: it skips the tokenizer (a second of loading)
        self.tokenizer = load_tokenizer(folder) if tokenizer else None
        self.eos_token_ids = eos_token_ids(folder, self.cfg, self.tokenizer,
                                           load_if_needed=not tokenizer)
        self.tp = tp
        self.layout, host = self._read()
        self._make_model(kv, kernels, use_native, batch_invariant)
        self.steps_bound = 0  # steps run since the weights were last bound
        # decode steps replayed from captured CUDA graphs (models/graphs.py)
        self.graphs = (DecodeGraphs(name, self.model, self.kv_view, self.block_tokens, device,
                                    self.window_group[0] if self.window_group else 0)
                       if cuda_graphs and device.type == "cuda" else None)
        self.weight_pool = weight_pool
        if weight_pool is None:
            self.weights = host if device.type == "cpu" else host.to(device)
            self.model.bind(self.layout.views(self.weights))
        else:  # last: nothing after this may fail, or the pool would keep a dead entry
            weight_pool.register(name, self.layout, host, self._reload,
                                 on_evict=self.model.unbind)
        self.adapter_config = adapters or AdapterConfig()
        # made by the first adapter, dropped with the last; device copies in the KV pages
        self.adapter_pages: AdapterPages | None = None
        self.adapter_targets: dict[str, tuple[str, ...]] = {}
        logger.info("loaded model %s from %s (%s%s, %.1f MiB, %d KV tokens per page)", name,
                    folder, self.dtype, f", {quantization}" if quantization else "",
                    self.layout.num_bytes / 2**20, self.block_tokens)

    def _make_model(self, kv: KVStorage, kernels: str, use_native: bool,
                    batch_invariant: bool) -> None:
        """The forward pass and its KV view (views: one a KV group): of the whole model, or
        of rank 0's shard."""
        self.kv = kv  # its pages also hold the adapters (adapters/paged.py)
        local = self.cfg if self.tp is None else tp_shard.local_config(self.cfg, self.tp.world)
        self.model = LlamaModel(local, self.dtype, self.device,
                                backend.select(self.device, self.dtype, local, kernels,
                                               use_native, batch_invariant))
        if self.tp is not None:
            self.model.tp = self.tp.group
        self.kv_view = kv_views(kv, local, self.dtype)
        views = self.kv_view if isinstance(self.kv_view, tuple) else (self.kv_view,)
        self.block_tokens = views[0].shape[3]  # (the global layers' where they mix)
        # global and windowed layers mixed: (the windowed layers' tokens a page, their
        # widest window), their KV group's; else None
        self.window_group = ((views[1].shape[3], self.cfg.group_window) if len(views) > 1
                             else None)

    def _read(self) -> tuple:
        """(layout, a new host buffer of the weights): the whole model's, or rank 0's shard."""
        if self.tp is None:
            return load_flat_weights(self.folder, self.cfg, self.dtype, self.quantization)
        return tp_shard.load_shard(self.folder, self.cfg, self.dtype, self.tp.world, 0,
                                   self.quantization)[1:]

    def _reload(self) -> torch.Tensor:
        return self._read()[1]

    def make_resident(self, keep: frozenset[str] = frozenset()):
        """Ensure the weights are on the device (a swap, or a prefetch's first use: copy and
        rebind); the SwapIn, or None if they were bound already."""
        if self.weight_pool is None:
            return None
        swap = self.weight_pool.make_resident(self.name, keep)
        if swap is not None:
            self.model.bind(self.weight_pool.views(self.name))
            self.steps_bound = 0
        return swap

    def add_adapter(self, name: str, rank: int, targets: tuple[str, ...], weights) -> None:
        """Register the adapter (``weights``: its loader, called on first use); the first one
        makes this model's adapter pages (adapters/paged.py), laid out for the groups it
        targets; one on other groups lays them out again (:meth:`_relayout`)."""
        if self.tp is not None:  # rank 0 holds its part; each other rank reads its own
            weights = self._sharded(weights)
        if self.adapter_pages is None:
            self.adapter_pages = self._make_pages(target_groups(targets))
        elif not self.adapter_pages.holds(targets):
            self._relayout(targets)
        self.adapter_pages.add(name, rank, weights)
        self.adapter_targets[name] = targets
        if self.tp is not None:  # the ranks lay their pieces out as these are
            self.tp.command("add_adapter", self.name, name, weights.tp_spec, targets,
                            str(self.adapter_dtype).removeprefix("torch."),
                            sorted(self.adapter_pages.groups),
                            self.adapter_config.host_adapter_bytes)

    def _sharded(self, loader):
        """Rank 0's part of the adapter ``loader`` reads (models/tp.py ``shard_adapter``);
        ``tp_spec``: the file's, for the other ranks, which read it themselves (not
        ``spec``: the plans pack whole files, not a rank's part)."""
        spec = getattr(loader, "spec", None)
        if spec is None:
            raise AdapterError("an adapter of a tensor-parallel model must come from a PEFT "
                               "folder (each rank reads its part)")
        cfg, world = self.cfg, self.tp.world

        def shard():
            return tp_shard.shard_adapter(cfg, loader(), world, 0)
        shard.tp_spec = spec
        return shard

    def _relayout(self, targets: tuple[str, ...]) -> None:
        """New pieces laid out for the registered adapters' groups and those of ``targets``
        (between steps: the engine lock is held). The adapters stay registered; their
        device and host copies are dropped (read again on first use: a layout grows a few
        times at most, with the targeted projections)."""
        old = self.adapter_pages
        self.adapter_pages = self._make_pages(old.groups | target_groups(targets))
        self.adapter_pages.adopt(old)

    def _make_pages(self, groups) -> AdapterPages:
        """Adapter pages of this model laid out for ``groups``, over the KV pool."""
        cfg = self.adapter_config
        # float32 pieces of a bf16 model on CPU: bf16 copies in them for the fused kernel
        mirror = (self.device.type == "cpu" and self.dtype == torch.bfloat16
                  and self.adapter_dtype == torch.float32 and self.model.ops.fused_lora)
        memory = self.kv.storage.view(self.kv.pages.num_pages, self.kv.page_bytes)
        # the shard's config under tensor parallelism: pieces of rank 0's part
        return AdapterPages(self.model.cfg, groups, self.adapter_dtype, self.kv.pages, memory,
                            self.name, mirror, cfg.host_adapter_bytes,
                            cfg.max_loras_on_device)

    def pages_after(self, targets) -> dict[str, int] | None:
        """Each registered adapter's pages once an adapter on ``targets`` is registered, where
        that lays the pieces out again (larger pieces: more pages); None where it does not."""
        paged = self.adapter_pages
        if paged is None or paged.holds(targets):
            return None
        layout = PieceLayout.build(self.model.cfg, paged.groups | target_groups(targets),
                                   paged.layout.dtype, paged.layout.mirror_offset is not None)
        per_page = max(1, paged.page_bytes // layout.piece_bytes)
        return {n: -(-paged.num_pieces(r) // per_page) for n, r in paged.ranks.items()}

    def adapter_capacity(self) -> int:
        """Distinct adapters one step may hold: ``max_loras_on_device`` where set, else no
        count (the pages the scheduler finds for each decide)."""
        return self.adapter_config.max_loras_on_device or 1 << 30

    def adapter_page_request(self, name: str):
        """For the scheduler's admission: (the pool's key, pages, cost) of adapter ``name``'s
        device copy (adapters/paged.py ``page_request``)."""
        return self.adapter_pages.page_request(name)

    def remove_adapter(self, name: str) -> None:
        """Forget the adapter (the caller ensures nothing runs it); with the last one gone the
        adapter pages go."""
        if self.tp is not None and name in self.adapter_targets:
            self.tp.command("remove_adapter", self.name, name)
        if self.adapter_pages is not None:
            self.adapter_pages.remove(name)
            if not self.adapter_pages.ranks:
                self.adapter_pages.release()
                self.adapter_pages = None
        self.adapter_targets.pop(name, None)

    def prefetch_adapters(self, names, running=()) -> int:
        """Start reading the host copies of ``names`` (queued requests' adapters, in the
        order they will run) beside the steps, and drop reads of adapters neither queued
        nor in ``running`` (this step's); how many reads started."""
        if self.adapter_pages is None:
            return 0
        self.adapter_pages.keep_reads(set(names) | set(running))
        return sum(self.adapter_pages.prefetch(n) for n in names)

    def _lora_batch(self, batch: list[BatchRow]) -> LoraBatch | None:
        rows = [item.adapter for item in batch for _ in item.token_ids]
        names = {n for n in rows if n}
        if not names:
            return None
        owners: dict = {}  # each adapter charged to its first row's tenant (the scheduler's)
        for item in batch:
            if item.adapter:
                owners.setdefault(item.adapter, item.tenant)
        tables = self.adapter_pages.ensure(names, owners,
                                           self.adapter_config.max_loras_per_tenant)
        return LoraBatch.build(rows, tables, self.adapter_pages, self.adapter_targets,
                               self.device, self.model.ops,
                               batched=self.adapter_dtype != self.dtype,
                               reduce=None if self.tp is None else self.model.tp.all_reduce)

    def batch(self, rows: list[BatchRow]) -> ForwardBatch:
        """The step's tensors of ``rows`` for this model (``runner.build_batch``)."""
        return build_batch(rows, self.block_tokens, self.device, self.model.rope_long_offset,
                           self.window_group[0] if self.window_group else 0)

    def execute(self, rows: list[BatchRow]):
        """Run one step (the caller made the weights resident); logits [rows that sample,
        vocab] in float32. With rows that pool (``hidden``), the pair (those logits, the
        pooled rows' final-norm output: ``LlamaModel.forward``)."""
        self.steps_bound += 1
        if self.steps_bound == PACK_AFTER_STEPS and self.device.type == "cpu":
            self.model.pack_weights()  # stayed resident: worth a reorder (kernels.linear)
        if (self.graphs is not None and not any(r.hidden or r.rope_long for r in rows)
                and self.graphs.eligible(rows) and self.model.ops.capture_safe):
            logits = self.graphs.run(rows)
            if logits is not None:
                return logits
        batch = self.batch(rows)
        lora = self._lora_batch(rows)  # adapters loaded first: a failure stops rank 0 alone
        if self.tp is not None:  # the other ranks run the same step beside this one
            self.tp.command("forward", self.name, batch,
                            None if lora is None else tp_shard.adapter_runs(rows))
            # each rank reads its part of an adapter itself: whether all could, summed
            if lora is not None and float(self.model.tp.all_reduce(torch.zeros(1))[0]):
                raise AdapterError("a tensor-parallel rank could not read an adapter of this "
                                   "step (its log says why)")
        return self.model.forward(batch, self.kv_view, lora)
