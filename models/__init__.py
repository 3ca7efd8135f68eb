"""Llama-family model definitions whose weights are views into a flat buffer."""
