"""Base models and tokenizers: loading them (hub, local folder, GGUF) and the attention paths.

``loading`` resolves a model name to weights and a tokenizer; ``attention`` holds the
per-conversation attention used by packed training and by the engine.
"""
