"""CUDA graphs of a model's decode step: one launch a step instead of hundreds.

On a GPU a small model's decode step is host overhead: SmolLM2-135M launches about 830
kernels a token and keeps an H200 busy 1.8 ms of a 37 ms step (measured with torch.profiler,
``benchmarks/bench_gpu.py``). A captured graph replays every launch of the forward pass at
once. ``DecodeGraphs`` captures one graph per batch size (lazily, at the size's first step)
for steps whose rows are all single-token decode rows without adapters, and replays it after
copying the step's inputs into the graph's static tensors:

- inputs: token ids, positions, the page and slot each token's K/V goes to, block tables
  (as wide as the model's longest context, so a graph serves any context length: the Triton
  attention kernel reads only ``context_lens[b]`` tokens of each row) and context lengths;
  a model whose windowed layers are a KV group of their own, their slots and tables too;
- the weights: views into the arena slab where the model is resident. A graph holds their
  addresses, so all graphs are dropped when the model comes back in a different slab
  (``key``: the weights' address);
- the KV view is the same storage for the engine's life.

Eager and replayed steps run the same kernels on the same data, so their outputs are equal.
Only where every kernel is capture-safe: Triton kernels on (not ``GPUPOOL_KERNELS=reference``,
whose attention reads lengths on the host); a capture that fails turns graphs off for the
model (logged) and the step runs eagerly. ``Config.cuda_graphs`` (on by default on CUDA) or
``GPUPOOL_CUDA_GRAPHS=0`` turns them off.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from gpupool.models.batch import BatchRow, ForwardBatch

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 64  # batch sizes above this run eagerly


class _Graph:
    def __init__(self, n: int, max_pages: int, device: torch.device,
                 max_window_pages: int = 0):
        """``max_window_pages``: a model whose windowed layers are a KV group of their own,
        their block tables' width (0: none)."""
        def z(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.n = n
        # ids, positions, slot pages, slot offsets (then the windowed layers' slots)
        self.longs = z(6 if max_window_pages else 4, n)
        # block tables, context lengths (then the windowed layers' block tables)
        self.ints = z(n * (max_pages + 1 + max_window_pages), dtype=torch.int32)
        at = n * max_pages + n
        self.batch = ForwardBatch(
            input_ids=self.longs[0], positions=self.longs[1], slot_pages=self.longs[2],
            slot_offsets=self.longs[3], num_decode=n,
            decode_block_tables=self.ints[: n * max_pages].view(n, max_pages),
            decode_context_lens=self.ints[n * max_pages : at],
            prefill_block_tables=z(0, 1, dtype=torch.int32),
            prefill_cu_seqlens=z(1, dtype=torch.int32),
            prefill_context_lens=z(0, dtype=torch.int32),
            logits_indices=torch.arange(n, device=device),
        )
        if max_window_pages:
            self.batch = dataclasses.replace(self.batch, window_group=dataclasses.replace(
                self.batch, slot_pages=self.longs[4], slot_offsets=self.longs[5],
                decode_block_tables=self.ints[at:].view(n, max_window_pages)))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, name: str, model, kv_view, block_tokens: int, device: torch.device,
                 window_tokens: int = 0):
        """``window_tokens``: a model whose windowed layers are a KV group of their own
        (``kv_view`` then its groups' views), their tokens a page; else 0."""
        self.name = name
        self.model = model
        self.kv_view = kv_view
        self.block_tokens = block_tokens
        self.window_tokens = window_tokens
        self.device = device
        self.max_pages = -(-model.cfg.max_model_len // block_tokens)
        self.max_window_pages = (-(-model.cfg.max_model_len // window_tokens)
                                 if window_tokens else 0)
        self.graphs: dict[int, _Graph] = {}
        self.pool = None  # one memory pool shared by every size's graph (replayed in turn)
        self.key: int | None = None  # the weights' address the graphs were captured with
        self.enabled = True
        self.num_captures = 0
        self.num_replays = 0

    def eligible(self, rows: list[BatchRow]) -> bool:
        return (self.enabled and 0 < len(rows) <= MAX_GRAPH_BATCH
                and all(r.is_decode and len(r.token_ids) == 1 and r.samples
                        and r.adapter is None and not r.all_logits
                        and len(r.pages) <= self.max_pages
                        and len(r.window_pages or ()) <= self.max_window_pages for r in rows))

    def _fill(self, g: _Graph, rows: list[BatchRow]) -> None:
        bt, wbt = self.block_tokens, self.window_tokens
        ids, pos, pages, offs, tables, lens = [], [], [], [], [], []
        wpages, woffs, wtables = [], [], []
        for r in rows:
            p = r.start
            ids.append(r.token_ids[0])
            pos.append(p)
            pages.append(r.pages[p // bt])
            offs.append(p % bt)
            tables.extend(r.pages)
            tables.extend([0] * (self.max_pages - len(r.pages)))
            lens.append(p + 1)
            if wbt:  # the windowed layers' pages (released ones name page 0)
                wpages.append(r.window_pages[p // wbt])
                woffs.append(p % wbt)
                wtables.extend(r.window_pages)
                wtables.extend([0] * (self.max_window_pages - len(r.window_pages)))
        longs = [ids, pos, pages, offs] + ([wpages, woffs] if wbt else [])
        g.longs.copy_(torch.tensor(longs, dtype=torch.long))
        g.ints.copy_(torch.tensor(tables + lens + wtables, dtype=torch.int32))

    def run(self, rows: list[BatchRow]) -> torch.Tensor | None:
        """Logits [len(rows), vocab] in float32, or None where the step must run eagerly."""
        key = self.model.w["embed_tokens"].data_ptr()
        if key != self.key:  # the weights moved (another slab): every graph is stale
            self.graphs.clear()
            self.key = key
        n = len(rows)
        g = self.graphs.get(n)
        if g is None:
            g = _Graph(n, self.max_pages, self.device, self.max_window_pages)
            self._fill(g, rows)
            if not self._capture(g):
                return None
            self.graphs[n] = g
        else:
            self._fill(g, rows)
        g.graph.replay()
        self.num_replays += 1
        return g.logits.clone()  # the static output is overwritten by the next replay

    def _capture(self, g: _Graph) -> bool:
        """Warm up on a side stream (Triton compiles; the K/V writes are the step's own, so
        repeating them is harmless), then capture. False (and graphs off) if it fails."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.model.forward(g.batch, self.kv_view, None)
            torch.cuda.current_stream(self.device).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                g.logits = self.model.forward(g.batch, self.kv_view, None)
            g.graph = graph
            self.num_captures += 1
            return True
        except Exception:  # noqa: BLE001 - any failure: run eagerly from now on
            logger.exception("capturing a CUDA graph of %s's decode step (batch %d) failed; "
                             "its steps run without graphs", self.name, g.n)
            self.enabled = False
            self.graphs.clear()
            torch.cuda.synchronize(self.device)
            return False
