"""Prefix training (PEFT prefix tuning on the frozen base model) and the shipped example tasks.

Nothing in the engine, the registry or the scheduler imports this package; it imports them.
"""
