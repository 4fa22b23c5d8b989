"""The engine: the frozen base model and the batched, prefix-aware forward passes. Torch lives here."""
