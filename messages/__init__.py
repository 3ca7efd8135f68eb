"""What crosses the engine boundary: plain dataclasses (no tensors) and the client protocol."""
