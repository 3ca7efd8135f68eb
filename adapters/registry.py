"""Which adapters exist, for which base, and how many requests are using each.

Removing an adapter with requests in flight marks it *removing*: new requests are refused at
once, running ones finish, and the adapter is dropped when the last one ends.

Replacing one in place (vLLM's ``load_inplace``) registers the new weights under a version
name (``name#2``, ``#`` being no name's character) that the public name then resolves to,
and removes the old version that way: running requests finish on the old weights, new ones
get the new, and the two never share cached KV (the prefix cache keys by the version name).
"""

from __future__ import annotations

from gpupool.adapters.base import AdapterError, AdapterRef


class AdapterRegistry:
    def __init__(self):
        self.refs: dict[str, AdapterRef] = {}
        self.in_flight: dict[str, int] = {}
        self.removing: set[str] = set()
        self.current: dict[str, str] = {}  # a replaced adapter's name -> its version's name
        self.versions: dict[str, int] = {}  # ... -> its last version number

    def add(self, ref: AdapterRef) -> None:
        if ref.name in self.refs:
            raise AdapterError(f"adapter {ref.name!r} is already loaded")
        self.refs[ref.name] = ref
        self.in_flight[ref.name] = 0

    def get(self, name: str) -> AdapterRef | None:
        """The adapter (its current version) if it can take new requests; a version's own
        name is no adapter's."""
        if "#" in name:
            return None
        name = self.current.get(name, name)
        return None if name in self.removing else self.refs.get(name)

    def holds(self, name: str) -> bool:
        """Whether ``name`` is an adapter, or the version of one, still registered (maybe
        draining its running requests)."""
        return name in self.refs or name in self.current

    def next_version(self, name: str) -> str:
        """The name the next version of adapter ``name`` is registered under (never one
        still registered: an old version may be draining)."""
        k = self.versions.get(name, 1) + 1
        while f"{name}#{k}" in self.refs:
            k += 1
        return f"{name}#{k}"

    def replace(self, name: str, ref: AdapterRef) -> str | None:
        """Make ``ref`` (named ``next_version(name)``) what ``name`` resolves to; the old
        version is removed. Returns the old version's name when it can be dropped now."""
        old = self.current.get(name, name)
        if old not in self.refs or old in self.removing:
            raise AdapterError(f"adapter {name!r} is not loaded")
        self.add(ref)
        self.current[name] = ref.name
        self.versions[name] = int(ref.name.rsplit("#", 1)[1])
        return old if self._remove(old) else None

    def acquire(self, name: str) -> AdapterRef:
        """One request more on adapter version ``name`` (what ``get`` resolved)."""
        ref = None if name in self.removing else self.refs.get(name)
        if ref is None:
            state = "being removed" if name in self.removing else "not loaded"
            raise AdapterError(f"adapter {name!r} is {state}")
        self.in_flight[name] += 1
        return ref

    def release(self, name: str) -> bool:
        """One request ended; True when the adapter should now be dropped."""
        self.in_flight[name] -= 1
        return name in self.removing and self.in_flight[name] == 0

    def remove(self, name: str) -> str | None:
        """Refuse new requests; the name of its version when it can be dropped now (nothing
        in flight), else None."""
        version = self.current.get(name, name)
        if version not in self.refs or version in self.removing:
            raise AdapterError(f"adapter {name!r} is not loaded")
        self.current.pop(name, None)  # versions stay counted: a re-added name's next
        return version if self._remove(version) else None  # version is a new name

    def _remove(self, version: str) -> bool:
        self.removing.add(version)
        return self.in_flight[version] == 0

    def drop(self, name: str) -> AdapterRef:
        self.removing.discard(name)
        self.in_flight.pop(name)
        public = name.split("#", 1)[0]
        if self.current.get(public) == name:  # dropped with its base model
            del self.current[public]
        return self.refs.pop(name)

    def names(self) -> dict[str, AdapterRef]:
        """Adapter name -> its current version, for adapters that take requests."""
        out = {}
        for version, ref in self.refs.items():
            if version not in self.removing:
                out[version.split("#", 1)[0]] = ref
        return out

    def clear_in_flight(self) -> list[str]:
        """After every request was failed: zero the counts; returns the adapters being
        removed, which can now be dropped."""
        for name in self.in_flight:
            self.in_flight[name] = 0
        return sorted(self.removing)

    def check_integrity(self, live_counts: dict[str, int]) -> None:
        """``live_counts``: adapter -> unfinished requests seen by the engine."""
        for name, n in self.in_flight.items():
            assert n == live_counts.get(name, 0), f"in-flight count of {name!r} is {n}"
        assert set(live_counts) <= set(self.refs), "a request uses an unregistered adapter"
        assert self.removing <= set(self.refs)
