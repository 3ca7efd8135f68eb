"""Which models and adapters the server knows, and loading them into the engine.

Models and adapters come from the config file and flags (loaded at start) or from the admin
API (stored in Redis, so a restarted server knows them again and loads each on first use).
Paths given to the admin API must resolve, symlinks followed, under a ``--model-root``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

from gpupool.api.errors import APIError, model_not_found
from gpupool.api.state import StateStore
from gpupool.config import ServerConfig, check_model_options
from gpupool.config import check_name as config_check_name
from gpupool.frontend.pooling import pooling_of
from gpupool.frontend.reasoning import END, HARMONY, START, reasoning_markers
from gpupool.messages.client import EngineClient
from gpupool.messages.errors import AdapterError, ModelLoadError, RequestError
from gpupool.messages.types import AddAdapter, AddModel, RemoveAdapter, RemoveModel

logger = logging.getLogger(__name__)

def check_name(name, what: str = "name", slash: bool = True) -> str:
    """``config.check_name`` as a 400 naming the field: models and adapters may hold ``/``,
    tenants may not."""
    try:
        return config_check_name(name, what, slash)
    except ValueError as e:
        raise APIError(400, str(e), param=what) from None


def files_outside(folder: Path, roots: list[Path]) -> list[str]:
    """Files under ``folder`` (already resolved) whose own resolved path (a symlinked file
    followed) lies under none of ``roots``."""
    out = []
    for path in folder.rglob("*"):
        resolved = path.resolve()
        if not any(resolved == r or r in resolved.parents for r in roots):
            out.append(str(path.relative_to(folder)))
    return out


class ModelManager:
    def __init__(self, client: EngineClient, store: StateStore, config: ServerConfig):
        self.client = client
        self.store = store
        self.roots = [Path(r).expanduser().resolve() for r in config.model_roots]
        self.static_models = {m.name: m for m in config.models}
        self.static_adapters = {a.name: a for a in config.adapters}
        self._removed: set[str] = set()  # config entries removed through the admin API
        self._replaced: dict[str, str] = {}  # config adapters replaced in place: new paths
        # one lock for every load and every admin change, so a load never races a removal
        # or a second add of the same name (loads are rare; served names skip it)
        self._lock = asyncio.Lock()

    # ---- what is known --------------------------------------------------------------------
    def models(self) -> dict[str, dict]:
        out = {n: dict(v) for n, v in self.store.models().items()}
        for n, m in self.static_models.items():
            out[n] = _spec(m)
        return {n: v for n, v in out.items() if n not in self._removed}

    def spec_of(self, name: str) -> dict:
        """The registration of ``name``'s base model (``name`` may be an adapter): its
        ``reasoning_parser`` and ``task`` decide how the routes serve it; {} if unknown."""
        models = self.models()
        if name not in models:
            base = self.adapters(models).get(name, {}).get("base")
            name = base if base is not None else name
        return models.get(name, {})

    def adapters(self, models: dict | None = None) -> dict[str, dict]:
        """Adapters whose base is known (``models``: the result of ``models()`` if already
        read, to spare a second store read)."""
        out = {n: dict(v) for n, v in self.store.adapters().items()}
        for n, a in self.static_adapters.items():
            out[n] = {"base": a.base, "path": self._replaced.get(n, a.path)}
        models = self.models() if models is None else models
        return {n: v for n, v in out.items() if n not in self._removed and v["base"] in models}

    def known(self) -> dict[str, str | None]:
        """Every servable name -> its base model (None for base models)."""
        models = self.models()
        out: dict[str, str | None] = dict.fromkeys(models)
        out.update({n: a["base"] for n, a in self.adapters(models).items()})
        return out

    def served(self, name: str) -> bool:
        """Whether the engine takes requests for ``name`` now."""
        return self.client.model_info(name) is not None

    # ---- loading --------------------------------------------------------------------------
    async def ensure(self, name: str) -> None:
        """Load ``name`` (and its base) into the engine if it is known but not loaded yet."""
        if self.served(name):
            return
        async with self._lock:
            await self._ensure_locked(name)

    async def _ensure_locked(self, name: str) -> None:
        if self.served(name):
            return
        models = self.models()  # registered now, under the lock
        adapters = self.adapters(models)
        try:
            if name in models:
                self._recheck(name, models[name]["path"], name in self.static_models)
                await self._load_model(name, models[name])
            elif name in adapters:
                spec = adapters[name]
                self._recheck(name, spec["path"], name in self.static_adapters)
                await self._ensure_locked(spec["base"])
                await self.client.command(AddAdapter(name, spec["base"], spec["path"]))
            else:
                raise model_not_found(name)
        except (ModelLoadError, AdapterError, RequestError, OSError, ValueError) as e:
            raise APIError(503, f"model {name!r} is registered but could not be loaded: "
                                f"{e}", param="model", code="model_load_failed") from e

    def _recheck(self, name: str, path: str, static: bool) -> None:
        """A stored registration's path checked again against this server's model roots
        at every load (the roots may be narrower than when it was added). Config and flag
        entries are the operator's own: not checked."""
        if static:
            return
        try:
            self.check_path(path, gguf=True)
        except APIError as e:
            logger.warning("model %s not loaded: its stored path %s: %s", name, path, e.message)
            raise APIError(503, f"model {name!r} is registered but could not be loaded: its "
                                "path is not under this server's --model-root",
                           param="model", code="model_load_failed") from None

    async def _load_model(self, name: str, spec: dict) -> None:
        await self.client.command(AddModel(name, spec["path"], spec.get("ttft_ms") or None,
                                           spec.get("tbt_ms") or None, spec.get("dtype"),
                                           spec.get("quantization")))
        try:
            parser = spec.get("reasoning_parser")
            if parser and reasoning_markers(self.client.tokenizer(name), parser) is None:
                need = HARMONY if parser == "gpt_oss" else (START, END)
                raise ValueError(f"reasoning_parser {parser}: the model's vocabulary has no "
                                 f"{' and '.join(need)} tokens")
            if spec.get("task") == "embed":
                pooling_of(spec["path"])  # its pooling is one the engine does
        except ValueError:
            with contextlib.suppress(RequestError):
                await self.client.command(RemoveModel(name))
            raise
        logger.info("loaded model %s from %s", name, spec["path"])

    async def load_static(self) -> None:
        """Config and flag models and adapters, loaded at start (errors stop the server)."""
        for name, m in self.static_models.items():
            await self._load_model(name, _spec(m))
        for name, a in self.static_adapters.items():
            if a.base not in self.static_models and a.base not in self.store.models():
                raise ValueError(f"adapter {name!r}: base model {a.base!r} is not declared")
            if not self.served(a.base):
                await self._load_model(a.base, self.store.models()[a.base])
            await self.client.command(AddAdapter(name, a.base, a.path))

    # ---- admin changes --------------------------------------------------------------------
    def check_path(self, path, gguf: bool = False) -> str:
        """``path`` resolved, if it is a folder (or, with ``gguf``, a ``.gguf`` file) under a
        model root; else an APIError (404 where nothing is there, as vLLM answers)."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise APIError(400, "path must be a non-empty string without NUL", param="path")
        if not self.roots:
            raise APIError(403, "loading from paths is disabled: start the server with "
                                "--model-root DIR", param="path", code="no_model_root")
        try:
            resolved = Path(path).expanduser().resolve()
            inside = any(resolved == r or r in resolved.parents for r in self.roots)
            outside = files_outside(resolved, self.roots) if inside and resolved.is_dir() else []
        except (RuntimeError, OSError, ValueError) as e:  # ~nosuchuser, a symlink loop
            raise APIError(400, f"path {path!r} cannot be resolved: {e}", param="path") from None
        if not inside:
            raise APIError(403, f"path {path!r} is outside the allowed model roots",
                           param="path", code="path_not_allowed")
        if not resolved.exists():  # vLLM's answer for a LoRA path that is not there
            raise APIError(404, f"path {path!r} does not exist", param="path",
                           code="not_found")
        is_gguf = gguf and resolved.suffix == ".gguf" and resolved.is_file()
        if not resolved.is_dir() and not is_gguf:
            raise APIError(400, f"path {path!r} is not a folder" + (" or a .gguf file" if gguf
                                                                      else ""), param="path")
        if outside:  # a symlinked file inside may point anywhere
            raise APIError(403, f"path {path!r} holds files that resolve outside the allowed "
                                f"model roots: {', '.join(sorted(outside)[:5])}",
                           param="path", code="path_not_allowed")
        return str(resolved)

    def _check_free(self, name: str) -> None:
        if name in self.known() or self.served(name):
            raise APIError(409, f"{name!r} is already the name of a model or adapter",
                           param="name", code="name_taken")
        if self.client.holds_name(name):
            raise APIError(409, f"{name!r} was removed but still finishes running requests; "
                                "add it again once they are done", param="name",
                           code="name_draining", headers={"Retry-After": "1"})

    async def add_model(self, name: str, path: str, **options) -> None:
        """``options``: ttft_ms, tbt_ms, dtype, quantization, reasoning_parser, task."""
        async with self._lock:
            await self._add_model(name, path, **options)

    async def add_adapter(self, name: str, base: str, path: str,
                          replace: bool = False) -> None:
        """``replace``: an adapter ``name`` of ``base`` gets the weights in ``path``
        (vLLM's load_inplace: running requests finish on the old ones); a new name is
        added as without it."""
        async with self._lock:
            if replace and self.adapters().get(name, {}).get("base") == base:
                await self._replace_adapter(name, base, path)
            else:
                await self._add_adapter(name, base, path)

    async def _replace_adapter(self, name: str, base: str, path: str) -> None:
        path = self.check_path(path)
        try:
            if self.served(name):
                await self.client.command(AddAdapter(name, base, path, replace=True))
            else:  # not loaded yet: check it the way a load would, with the new path
                await self._ensure_locked(base)
                await self.client.command(AddAdapter(name, base, path))
        except (AdapterError, RequestError, ValueError, OSError) as e:
            raise APIError(400, f"cannot load adapter {name!r}: {e}", param="path") from e
        if name in self.static_adapters:
            self._replaced[name] = path
        else:
            self.store.put_adapter(name, base, path)

    def base_for(self, path: str) -> str:
        """vLLM's rule for an adapter loaded without a base: the registered model its
        ``base_model_name_or_path`` names (by name, or by the folder it was loaded from),
        else the only registered model; else a 400."""
        resolved = Path(self.check_path(path))
        try:
            named = json.loads((resolved / "adapter_config.json").read_text()).get(
                "base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            named = None
        bases = self.models()
        for name, spec in bases.items():
            if named and (named == name or _same_folder(named, spec.get("path"))):
                return name
        if len(bases) == 1:
            return next(iter(bases))
        raise APIError(400, f"adapter's base_model_name_or_path {named!r} names none of the "
                            f"registered models ({', '.join(sorted(bases)) or 'none'}); load "
                            "it with POST /admin/adapters and a base", param="lora_path")

    async def remove_model(self, name: str) -> None:
        async with self._lock:
            await self._remove_model(name)

    async def remove_adapter(self, name: str) -> None:
        async with self._lock:
            await self._remove_adapter(name)

    async def _add_model(self, name: str, path: str, **options) -> None:
        check_name(name)
        try:
            check_model_options(name, options.get("reasoning_parser"),
                                options.get("task") or "generate")
        except ValueError as e:
            raise APIError(400, str(e), param="reasoning_parser") from None
        path = self.check_path(path, gguf=True)
        self._check_free(name)
        spec = {"path": path, **options}
        try:
            await self._load_model(name, spec)
        except (ModelLoadError, RequestError, ValueError, OSError) as e:
            raise APIError(400, f"cannot load model {name!r}: {e}", param="path") from e
        self.store.put_model(name, spec)
        self._removed.discard(name)

    async def _add_adapter(self, name: str, base: str, path: str) -> None:
        check_name(name)
        path = self.check_path(path)
        self._check_free(name)
        if base not in self.models():
            raise APIError(404, f"base model {base!r} does not exist", param="base",
                           code="model_not_found")
        await self._ensure_locked(base)
        try:
            await self.client.command(AddAdapter(name, base, path))
        except (AdapterError, RequestError, ValueError, OSError) as e:
            raise APIError(400, f"cannot load adapter {name!r}: {e}", param="path") from e
        self.store.put_adapter(name, base, path)
        self._removed.discard(name)

    async def _remove_model(self, name: str) -> None:
        if name not in self.models():
            raise APIError(404, f"model {name!r} does not exist", code="model_not_found")
        for adapter, spec in self.adapters().items():
            if spec["base"] == name:
                await self._remove_adapter(adapter)
        if self.served(name):
            try:
                await self.client.command(RemoveModel(name))
            except RequestError:
                pass  # already leaving
        self.store.delete_model(name)
        self.store.revoke_grants(name)
        if name in self.static_models:
            self._removed.add(name)

    async def _remove_adapter(self, name: str) -> None:
        if name not in self.adapters():
            raise APIError(404, f"adapter {name!r} does not exist", code="model_not_found")
        if self.served(name):
            try:
                await self.client.command(RemoveAdapter(name))
            except (AdapterError, RequestError):
                pass
        self.store.delete_adapter(name)
        self.store.revoke_grants(name)
        if name in self.static_adapters:
            self._removed.add(name)


def _spec(m) -> dict:
    """A config or flag model's registration, as the admin API stores one."""
    return {"path": m.path, "ttft_ms": m.ttft_ms, "tbt_ms": m.tbt_ms, "dtype": m.dtype,
            "quantization": m.quantization, "reasoning_parser": m.reasoning_parser,
            "task": m.task}


def _same_folder(a: str, b: str | None) -> bool:
    try:
        return b is not None and Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
