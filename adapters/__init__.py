"""LoRA adapters: PEFT adapter loading, the registry, and their pages in the KV pool."""
