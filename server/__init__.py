"""prefix-server: one frozen base model, many prefix-tuned tasks, mixed in every batch."""

__version__ = "0.1.0"
