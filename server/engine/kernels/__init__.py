"""CPU kernels for the compiled decode step (`cpu_decode.cpp`), loaded as the torch ops
`torch.ops.prefix_server.*`:

    pack_linear(weight [N, K]) -> [N / 16, K, 16]        float32, bfloat16 or int8, N a multiple of 16
    linear(x [..., K], packed, bias?) -> [..., N]         x in the weight's dtype, float32 or bfloat16
                                                          (accumulated in float32), AVX-512
    linear_int8(x [..., K], packed, scales, bias?)       weight-only int8: float32 scales per output feature
        -> [..., N]                                       and group of K (packed [N / 16, G, 16]); x float32
                                                          or bfloat16 (its dtype out), AVX-512
    pack_q8(weight int8 [N, K]) -> uint8                  w + 128 as [N / 16, K / 4, 16, 4]; N a multiple of
                                                          16, K of 32
    linear_q8(x [..., K], packed, scales, bias?)          int8 x int8 (llama.cpp's Q8_0 x Q8_0): x rounded
        -> [..., N]                                       to int8 per row and 32 k, exact int32 dot products
                                                          (vpdpbusd), both scales per group; AVX-512 VNNI
    pack_a16(weight int8 [N, K]) -> int8                  [N / 16, K / 2, 16, 2]; N a multiple of 16, K of 32
    linear_a16(x [..., K], packed, scales, bias?)         int8 x int16: x rounded to int16 per row and 32 k
        -> [..., N]                                       (~weight-only's result), vpdpwssd; AVX-512 VNNI
    has_vnni() -> bool                                    whether this CPU runs linear_q8 and linear_a16
    write_kv(keys!, values!, layer, slots [b], k, v)      the pool's dtype, any device: each row's new K/V
                                                          into its pool slot
    paged_attention(q [b, heads, d], keys, values, layer, block_tables [b, blocks], prefix_lens [b],
                    own_lens [b], scale) -> [b, heads, d] q in the pool's dtype, float32 or bfloat16, AVX-512

Built once per machine (a C++ compiler and ninja, as inductor needs anyway; ~15-30 s) by `build.py` in a
child process, and kept under TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions) in a folder named by a
hash of the source, torch, Python and flags. The build can be killed at any instruction and leave
nothing a later process trusts or waits on: it runs in a fresh temporary folder renamed into place only
when whole (atomic), under an `fcntl.flock` that the kernel releases when its holder dies (torch's own
builder guards its folder with a lock *file* that a killed build leaves behind, and every later build
then waits on it forever). A build that does not finish within `timeout_s` is killed, and the decode
step stays eager, with one log line saying so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAME = "prefix_server_cpu_decode"
SOURCE = Path(__file__).with_name("cpu_decode.cpp")
CFLAGS = ("-O3", "-fopenmp")  # OpenMP: at::parallel_for runs on torch's threads
LDFLAGS = ("-fopenmp",)
BUILD_TIMEOUT_S = 600.0  # a cold build takes 15-30 s here; 10 minutes covers a busy or slow machine

_lock = threading.Lock()
_loaded: bool | None = None


def load(timeout_s: float = BUILD_TIMEOUT_S) -> bool:
    """Build (once per machine) and load the kernels (once per process). False, logged, where they cannot
    be built in `timeout_s` (the decode step then stays eager)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load(timeout_s)
        return _loaded


def avx512() -> bool:
    """Whether `linear` and `paged_attention` may run here (torch's own CPU dispatch level)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def vnni() -> bool:
    """Whether `linear_a16` and `linear_q8` may run here: AVX-512 with VNNI. Loads the kernels."""
    return avx512() and load() and torch.ops.prefix_server.has_vnni()


def build_root() -> Path:
    """Where built kernels are kept: TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions (torch's rule)."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def library_path(root: Path | None = None) -> Path:
    """The built library for this source, torch, Python and flags (a new folder when any changes)."""
    key = hashlib.sha256(
        b"\0".join(
            [SOURCE.read_bytes(), torch.__version__.encode(), sys.version.encode(), " ".join(CFLAGS).encode()]
        )
    ).hexdigest()[:16]
    return (root or build_root()) / f"{NAME}-{key}" / f"{NAME}.so"


def _load(timeout_s: float) -> bool:
    library = library_path()
    if not library.is_file():
        log.info(
            "building the CPU decode kernels into %s (once per machine, ~15-30 s; or waiting for the build "
            "of another process)",
            library.parent,
        )
        if not _build_in_child(library, timeout_s):
            return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as e:
        log.warning(
            "CPU decode kernels at %s could not be loaded (%s); the decode step stays eager", library, e
        )
        return False
    _register_fakes()
    return True


def _build_in_child(library: Path, timeout_s: float) -> bool:
    """Run build.py in its own process group, so that a timeout kills the compiler with it. Its output
    goes to a file, not a pipe: if this process dies, the build goes on and finishes for the next one."""
    cmd = [sys.executable, "-m", "server.engine.kernels.build", str(library), str(timeout_s)]
    repo = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    library.parent.parent.mkdir(parents=True, exist_ok=True)
    output = library.parent.with_name(f"{library.parent.name}.{os.getpid()}.log")
    with open(output, "w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.warning(
                "CPU decode kernels: the build did not finish within %.0f s (a slow machine, or another "
                "process's build holding the lock); the decode step stays eager",
                timeout_s,
            )
            return False
        except BaseException:  # e.g. KeyboardInterrupt in the main thread: the build stops with us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            output.unlink(missing_ok=True)
        out.seek(0)
        lines = out.read().strip().splitlines()
    if proc.returncode != 0 or not library.is_file():
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        log.warning("CPU decode kernels could not be built (%s); the decode step stays eager", why)
        return False
    return True


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing."""

    @torch.library.register_fake("prefix_server::pack_linear")
    def _(weight):
        return weight.new_empty((weight.shape[0] // 16, weight.shape[1], 16))

    @torch.library.register_fake("prefix_server::linear")
    def _(x, packed, bias):
        return x.new_empty((*x.shape[:-1], packed.shape[0] * 16))

    @torch.library.register_fake("prefix_server::linear_int8")
    def _(x, packed, scales, bias):
        return x.new_empty((*x.shape[:-1], packed.shape[0] * 16))

    @torch.library.register_fake("prefix_server::pack_q8")
    def _(weight):
        return weight.new_empty((weight.shape[0] // 16, weight.shape[1] // 4, 16, 4), dtype=torch.uint8)

    @torch.library.register_fake("prefix_server::linear_q8")
    def _(x, packed, scales, bias):
        return x.new_empty((*x.shape[:-1], packed.shape[0] * 16))

    @torch.library.register_fake("prefix_server::pack_a16")
    def _(weight):
        return weight.new_empty((weight.shape[0] // 16, weight.shape[1] // 2, 16, 2))

    @torch.library.register_fake("prefix_server::linear_a16")
    def _(x, packed, scales, bias):
        return x.new_empty((*x.shape[:-1], packed.shape[0] * 16))

    @torch.library.register_fake("prefix_server::write_kv")
    def _(keys, values, layer, slots, k, v):
        return None

    @torch.library.register_fake("prefix_server::paged_attention")
    def _(q, keys, values, layer, block_tables, prefix_lens, own_lens, scale):
        return torch.empty_like(q)
