"""A pool of engines over Redis: the gateway's engine client (``client.py``), the worker
registry (``registry.py``) and the Redis keys and streams they share (``keys.py``). No torch:
a gateway runs the HTTP layer and this, never an engine (``gpupool.worker`` is the engine
side)."""
