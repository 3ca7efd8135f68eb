"""LoRA adapters: PEFT adapter loading, the registry and device slots (issue: multi-LoRA)."""
