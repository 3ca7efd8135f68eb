"""What an engine has loaded: its models (one ``LoadedModel`` each) and their adapters, by name,
with removal that waits until nothing runs them. Used from the engine's one thread."""

from __future__ import annotations

from gpupool.adapters.base import AdapterRef
from gpupool.adapters.peft_format import PeftLoader, inspect_peft_adapter
from gpupool.adapters.registry import AdapterRegistry
from gpupool.engine.grammar import Grammars
from gpupool.messages.errors import AdapterError, RequestError
from gpupool.messages.types import EngineRequest
from gpupool.models.rope import rope_switch
from gpupool.pool.pages import PagePool
from gpupool.scheduler.scheduler import Scheduler


class ModelRegistry:
    """Models and adapters by name; a name is one or the other, never both."""

    def __init__(self, scheduler: Scheduler, pages: PagePool):
        self.scheduler = scheduler
        self.pages = pages
        self.workers: dict = {}  # name -> LoadedModel
        self.removing_models: set[str] = set()
        self.adapters = AdapterRegistry()
        self.grammars = Grammars()

    # ---- models -------------------------------------------------------------------------
    def add_worker(self, worker) -> None:
        if worker.name in self.workers:
            raise RequestError(f"model {worker.name!r} is already loaded")
        if self.adapters.holds(worker.name):
            raise RequestError(f"{worker.name!r} is already the name of an adapter")
        self.workers[worker.name] = worker
        self.scheduler.add_model(worker.name, worker.block_tokens, worker.adapter_capacity(),
                                 worker.adapter_config.max_loras_per_tenant or 1 << 30,
                                 rope_switch(worker.cfg), worker.cfg.kv_window,
                                 worker.window_group)

    def resolve(self, model: str) -> tuple[str, str | None]:
        """(base model, adapter or None) for a model or adapter name; RequestError if none."""
        if model in self.workers and model not in self.removing_models:
            return model, None
        ref = self.adapters.get(model)
        if ref is None or ref.base in self.removing_models:
            raise RequestError(f"model {model!r} is not loaded")
        return ref.base, ref.name

    def remove_model(self, name: str) -> None:
        """New requests for the model (and its adapters) fail at once; running ones finish,
        then its weights, adapters and queues are dropped."""
        if name not in self.workers or name in self.removing_models:
            raise RequestError(f"model {name!r} is not loaded")
        self.removing_models.add(name)
        self.drop_model_if_idle(name)

    def drop_model_if_idle(self, name: str) -> None:
        if name not in self.removing_models or self.scheduler.num_unfinished(name):
            return
        for adapter in [n for n, r in self.adapters.refs.items() if r.base == name]:
            self.drop_adapter(adapter)
        worker = self.workers.pop(name)
        self.pages.drop(name, everything=True)
        self.grammars.forget(name)
        if worker.weight_pool is not None:
            worker.weight_pool.unregister(name)
        if worker.tp is not None:  # the other tensor-parallel ranks drop their shards too
            worker.tp.command("unload", name)
        self.scheduler.remove_model(name)
        self.removing_models.discard(name)

    # ---- adapters -----------------------------------------------------------------------
    def add_adapter(self, name: str, base: str, path: str, replace: bool = False) -> AdapterRef:
        """Read, validate and register a PEFT LoRA adapter of a loaded base model. With
        ``replace``, a loaded adapter ``name`` of ``base`` gets these weights: its running
        requests finish on the old ones (``AdapterRegistry.replace``)."""
        if name in self.workers or (self.adapters.holds(name) and not replace):
            raise AdapterError(f"{name!r} is already the name of a model or adapter")
        worker = self.workers.get(base)
        if worker is None:
            raise AdapterError(f"base model {base!r} is not loaded")
        old = self.adapters.get(name) if replace else None
        if replace and (old is None or old.base != base):
            raise AdapterError(f"adapter {name!r} of {base!r} is not loaded: nothing to "
                               "replace")
        spec = inspect_peft_adapter(path, worker.cfg, worker.adapter_config.max_lora_rank)
        version = self.adapters.next_version(name) if replace else name
        ref = AdapterRef(version, base, str(path), spec.rank, spec.scaling, spec.targets)
        self._check_layout_growth(worker, name, spec.targets)
        # the weights are read on first use (AdapterPages.load_host), not now
        worker.add_adapter(version, spec.rank, spec.targets,
                           PeftLoader(spec, worker.cfg))
        if replace:
            dropped = self.adapters.replace(name, ref)
            if dropped is not None:
                self.drop_adapter(dropped)
        else:
            self.adapters.add(ref)
        return ref

    def _check_layout_growth(self, worker, name: str, targets) -> None:
        """AdapterError where registering an adapter on ``targets`` would lay the base's
        pieces out again so large that a request in flight no longer fits the pool with
        its adapter (admission checked it against the old sizes: it would wait for ever)."""
        grown = worker.pages_after(targets)
        if grown is None:
            return
        pool, base = self.pages.num_pages, worker.name
        peak = self.scheduler.peak_pages
        stuck = [q for q in (*self.scheduler.waiting.get(base, ()),
                             *self.scheduler.running.get(base, ()))
                 if q.adapter in grown
                 and peak(base, q.max_total_tokens) + grown[q.adapter] > pool]
        if stuck:
            # a mixture's experts named once a part, not once an expert
            shown = dict.fromkeys(t if not t.startswith("experts.")
                                  else "experts.*." + t.rsplit(".", 1)[-1] for t in targets)
            raise AdapterError(
                f"registering {name!r} on {', '.join(shown)} would lay {base!r}'s adapters "
                f"out again with more pages each, and {len(stuck)} request(s) in flight (e.g. "
                f"{stuck[0].request_id!r} on {stuck[0].adapter!r}) would then not fit the KV "
                f"pool of {pool} pages; register it when they are done, or raise "
                "kv_cache_bytes")

    def remove_adapter(self, name: str) -> None:
        """New requests for it fail at once; running ones finish, then it is dropped."""
        version = self.adapters.remove(name)
        if version is not None:
            self.drop_adapter(version)

    def drop_adapter(self, name: str) -> None:
        ref = self.adapters.drop(name)
        self.workers[ref.base].remove_adapter(name)
        self.pages.drop(ref.base, adapter=name)  # a new adapter of that name is another KV

    # ---- grammars -----------------------------------------------------------------------
    def compile_grammar(self, req: EngineRequest):
        """The request's compiled grammar (cached per model and schema); RequestError if its
        schema does not compile. Safe outside the engine lock."""
        worker = self.workers[self.resolve(req.model)[0]]
        tokenizer = worker.tokenizer
        if tokenizer is None:  # a cluster worker skips it until a grammar needs it
            from gpupool.models.tokenizer import load_tokenizer

            tokenizer = worker.tokenizer = load_tokenizer(worker.folder)
        return self.grammars.compile(worker.name, tokenizer, worker.cfg.vocab_size,
                                     worker.eos_token_ids, req.params.structured)
