"""OpenAI-compatible and admin HTTP API (issue: serving API)."""
