"""The engine: the step loop (scheduler -> model runner -> sampler) behind the message boundary."""
