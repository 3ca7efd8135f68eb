"""Requests, continuous batching, sampling, detokenisation and the engine loop's body."""
