"""cpu_kernels.Kernel: building, caching, the switch and a version mismatch (on the batch norm
kernel's source; isotropic_noise's tests cover a missing and a failing compiler)."""

import os
import shutil

import pytest

import cpu_kernels

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "cc")) is None, reason="needs a C compiler"
)


def kernel(version=1, switch="TIRG_GA_TEST_KERNEL"):
    return cpu_kernels.Kernel("batch_norm_kernel.c", "tirg_bn_", version, lambda lib: None, switch)


@needs_compiler
def test_built_once_into_the_cache_and_found_there(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = kernel()
    lib, status = first.load()
    assert lib is not None and status == f"C kernel {lib._name}"
    built = list((tmp_path / "tirg-ga" / "kernels").glob("batch_norm_kernel-*.so"))
    assert len(built) == 1 and str(built[0]) == lib._name
    mtime = built[0].stat().st_mtime_ns
    assert kernel().load()[1] == status  # another process: no second build
    assert built[0].stat().st_mtime_ns == mtime
    assert first.load()[0] is lib  # loaded once per process


def test_the_switch_keeps_the_kernel_off(monkeypatch):
    monkeypatch.setenv("TIRG_GA_TEST_KERNEL", "0")
    assert kernel().load() == (None, "torch operations (TIRG_GA_TEST_KERNEL=0)")


@needs_compiler
def test_a_version_mismatch_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib, status = kernel(version=99).load()
    assert lib is None
    assert status.startswith("torch operations (no C kernel: ")
    assert "batch_norm_kernel.c and its Python wrapper disagree on the version" in status
