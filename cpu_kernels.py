"""Small C kernels, built at first use with the machine's C compiler and cached.

A ``Kernel`` names a C source next to this file, the flags to build it with and how to declare
its functions for ctypes. ``load()`` returns (library, status): the library compiled into
``$XDG_CACHE_HOME/tirg-ga/kernels`` (or ``~/.cache/...``) under a hash of the source, the
compiler, the flags and the CPU's feature flags (-march=native), or (None, why not) where it
cannot be built: no compiler, a failing compiler, a version mismatch, or the kernel's
environment switch set to 0. Callers then compute the same thing with torch operations.
Processes that build at once write to temporary files and rename, so none reads a torn file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable

FLAGS = (
    "-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
    "-fno-signed-zeros", "-ffp-contract=off", "-fPIC", "-shared",
)  # fmt: skip
# No -ffast-math: in a shared library it switches the whole process to flush-to-zero.


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(root, "tirg-ga", "kernels")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="tirg-ga-kernels-")


def cpu_identity() -> bytes:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line
    except OSError:
        pass
    return platform.processor().encode()


class Kernel:
    """One C source, loaded once per process (thread-safe).

    source: file name next to this module; version: what its ``<prefix>version()`` returns;
    declare(lib): sets the functions' argtypes and restypes; switch: the environment variable
    that, set to "0", keeps the kernel off; libs: extra linker arguments; check(binary): raises
    OSError where a built library is not worth using."""

    def __init__(
        self,
        source: str,
        prefix: str,
        version: int,
        declare: Callable[[ctypes.CDLL], None],
        switch: str,
        libs: tuple[str, ...] = (),
        check: Callable[[bytes], None] | None = None,
    ):
        self.source = os.path.join(os.path.dirname(os.path.abspath(__file__)), source)
        self.prefix, self.version, self.declare = prefix, version, declare
        self.switch, self.libs, self.check = switch, libs, check
        self._lock = threading.Lock()
        self._loaded: tuple | None = None

    def reset(self) -> None:
        """Forget the loaded library: the next ``load()`` looks for it (or builds it) again."""
        with self._lock:
            self._loaded = None

    def load(self) -> tuple[ctypes.CDLL | None, str]:
        with self._lock:
            if os.environ.get(self.switch, "1") == "0":
                return None, f"torch operations ({self.switch}=0)"
            if self._loaded is None:
                try:
                    lib = ctypes.CDLL(self.build())
                    if getattr(lib, f"{self.prefix}version")() != self.version:
                        raise OSError(
                            f"{self.source} and its Python wrapper disagree on the version"
                        )
                    self.declare(lib)
                    self._loaded = (lib, f"C kernel {lib._name}")
                except (OSError, subprocess.SubprocessError) as e:
                    self._loaded = (None, f"torch operations (no C kernel: {e})")
            return self._loaded

    def build(self) -> str:
        """The path of the compiled library, compiled into the cache unless it is there."""
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            raise OSError("no C compiler (cc, or $CC) on PATH")
        with open(self.source, "rb") as f:
            source = f.read()
        identity = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(FLAGS + self.libs).encode(),
                        platform.machine().encode(), cpu_identity()])
        ).hexdigest()[:16]  # fmt: skip
        stem = os.path.splitext(os.path.basename(self.source))[0]
        path = os.path.join(cache_dir(), f"{stem}-{identity}.so")
        if os.path.exists(path):
            return path
        tmp = f"{path}.tmp.{os.getpid()}"  # several processes may build at once: rename atomically
        try:
            done = subprocess.run(
                [compiler, *FLAGS, self.source, "-o", tmp, *self.libs],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise OSError(f"{os.path.basename(compiler)} failed: {last}")
            if self.check is not None:
                with open(tmp, "rb") as f:
                    self.check(f.read())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
