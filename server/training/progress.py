"""Progress output of a training run, and silencing of a known PEFT/transformers deprecation warning."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable


@contextlib.contextmanager
def quiet_deprecations():
    """PEFT 0.21 still passes `past_key_values` (transformers 5 says `cache`): warned once per step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing", category=FutureWarning)
        yield


class Progress:
    """tqdm with the running loss when available and wanted, else a line every ~10% of the steps."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]) -> None:
        self.total, self.enabled, self.log, self.step, self.bar = total, enabled, log, 0, None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="prefix tuning", unit="step")
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.step % max(1, self.total // 10) == 0 or self.step == self.total):
            self.log(f"step {self.step}/{self.total} loss {loss:.4f}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
