"""Layer 3, models: loading base models and tokenizers, task heads, module surgery, kernels and speed-ups."""
