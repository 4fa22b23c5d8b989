"""CPU kernels for the compiled decode step (`cpu_decode.cpp`): built on first use with torch's extension
builder (a C++ compiler and ninja, as torch.compile's inductor needs anyway; about 30 s once, then cached
under TORCH_EXTENSIONS_DIR) and loaded as the torch ops `torch.ops.prefix_server.*`:

    pack_linear(weight [N, K]) -> [N / 16, K, 16]        float32, N a multiple of 16
    linear(x [..., K], packed, bias?) -> [..., N]         float32, AVX-512
    write_kv(keys!, values!, layer, columns [b], k, v)    any dtype: each row's new K/V into its slot
    decode_attention(q [b, heads, d], keys, values, layer, lengths [b], scale) -> [b, heads, d]
                                                          float32, AVX-512
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_decode.cpp")
_lock = threading.Lock()
_loaded: bool | None = None


def load() -> bool:
    """Build (once per machine) and load the kernels (once per process). False, logged, where they cannot
    be built (the decode step then stays eager)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
        return _loaded


def avx512() -> bool:
    """Whether `linear` and `decode_attention` may run here (torch's own CPU dispatch level)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _build() -> bool:
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip package: its binary, for machines without a system ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    try:
        cpp_extension.load(
            name="prefix_server_cpu_decode",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],  # OpenMP: at::parallel_for runs on torch's threads
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, a build error: all mean "not here"
        log.warning("CPU decode kernels could not be built (%s); the decode step stays eager", e)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing."""

    @torch.library.register_fake("prefix_server::pack_linear")
    def _(weight):
        return weight.new_empty((weight.shape[0] // 16, weight.shape[1], 16))

    @torch.library.register_fake("prefix_server::linear")
    def _(x, packed, bias):
        return x.new_empty((*x.shape[:-1], packed.shape[0] * 16))

    @torch.library.register_fake("prefix_server::write_kv")
    def _(keys, values, layer, columns, k, v):
        return None

    @torch.library.register_fake("prefix_server::decode_attention")
    def _(q, keys, values, layer, lengths, scale):
        return torch.empty_like(q)
