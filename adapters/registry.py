"""Which adapters exist, for which base, and how many requests are using each.

Removing an adapter with requests in flight marks it *removing*: new requests are refused at
once, running ones finish, and the adapter is dropped when the last one ends.
"""

from __future__ import annotations

from gpupool.adapters.base import AdapterError, AdapterRef


class AdapterRegistry:
    def __init__(self):
        self.refs: dict[str, AdapterRef] = {}
        self.in_flight: dict[str, int] = {}
        self.removing: set[str] = set()

    def add(self, ref: AdapterRef) -> None:
        if ref.name in self.refs:
            raise AdapterError(f"adapter {ref.name!r} is already loaded")
        self.refs[ref.name] = ref
        self.in_flight[ref.name] = 0

    def get(self, name: str) -> AdapterRef | None:
        """The adapter if it can take new requests."""
        return None if name in self.removing else self.refs.get(name)

    def acquire(self, name: str) -> AdapterRef:
        ref = self.get(name)
        if ref is None:
            state = "being removed" if name in self.removing else "not loaded"
            raise AdapterError(f"adapter {name!r} is {state}")
        self.in_flight[name] += 1
        return ref

    def release(self, name: str) -> bool:
        """One request ended; True when the adapter should now be dropped."""
        self.in_flight[name] -= 1
        return name in self.removing and self.in_flight[name] == 0

    def remove(self, name: str) -> bool:
        """Refuse new requests; True when it can be dropped now (nothing in flight)."""
        if name not in self.refs or name in self.removing:
            raise AdapterError(f"adapter {name!r} is not loaded")
        self.removing.add(name)
        return self.in_flight[name] == 0

    def drop(self, name: str) -> AdapterRef:
        self.removing.discard(name)
        self.in_flight.pop(name)
        return self.refs.pop(name)

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
