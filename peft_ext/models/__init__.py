"""transformers architectures of peft-ext (one sub-package per method, each registered with the Auto classes)."""
