"""The counter-based noise stream: the C kernel against the torch reference, its statistics,
and the fallback when the kernel cannot be built."""

import math
import os
import platform
import shutil
import sys

import pytest
import torch

import isotropic_noise as noise

KEY = 0xDEADBEEFCAFEF00D


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """An empty kernel cache (in tmp_path) and no kernel loaded: the next use builds again."""
    noise.KERNEL.reset()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(noise.ENV_SWITCH, raising=False)
    yield
    noise.KERNEL.reset()  # later tests load the kernel of the real cache


def kernel_expected() -> bool:
    return (
        sys.platform.startswith("linux")
        and platform.machine() == "x86_64"
        and shutil.which(os.environ.get("CC", "cc")) is not None
        and os.environ.get(noise.ENV_SWITCH, "1") != "0"
    )


@pytest.mark.skipif(not kernel_expected(), reason="needs x86-64 Linux with a C compiler")
def test_the_kernel_builds_on_x86_64_linux_with_a_compiler(fresh_kernel, tmp_path):
    status = noise.kernel_status()
    assert status.startswith("C kernel "), status
    assert str(tmp_path) in status  # built into the cache, and used from there
    noise.KERNEL.reset()
    assert noise.kernel_status() == status  # a second process finds it built


def kernel_or_skip():
    if noise.KERNEL.load()[0] is None:
        pytest.skip(f"no C kernel here: {noise.kernel_status()}")


@pytest.mark.parametrize("kind", noise.KINDS)
@pytest.mark.parametrize(
    "size, offset",
    [(0, 0), (1, 0), (1023, 0), (1025, 2048), (2048 * 5 + 17, 2048 * 9), (70_001, 0)],
)
def test_kernel_gives_the_reference_stream(kind, size, offset):
    kernel_or_skip()
    fast = noise.fill_(torch.empty(size), kind, KEY, 0.3, offset)
    slow = noise.reference(size, kind, KEY, 0.3, offset)
    if kind == "uniform":  # integers and exact scalings only: bit for bit
        assert torch.equal(fast, slow)
    else:  # the kernel's own sine and cosine, and float32 rounding: a few units in the last place
        torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6 * 0.3)


@pytest.mark.parametrize("switch", ["kernel", "torch"])
def test_any_chunking_gives_the_same_numbers(switch, monkeypatch):
    if switch == "torch":
        monkeypatch.setenv(noise.ENV_SWITCH, "0")
    whole = noise.fill_(torch.empty(50_000), "gaussian", KEY, 2.0)
    pieces = torch.empty(50_000)
    for start in range(0, 50_000, 3 * noise.BLOCK):
        noise.fill_(pieces[start : start + 3 * noise.BLOCK], "gaussian", KEY, 2.0, start)
    assert torch.equal(whole, pieces)


@pytest.mark.parametrize("switch", ["kernel", "torch"])
@pytest.mark.parametrize("kind", noise.KINDS)
def test_add_adds_the_filled_numbers_and_returns_their_dot(switch, kind, monkeypatch):
    if switch == "torch":
        monkeypatch.setenv(noise.ENV_SWITCH, "0")
    torch.manual_seed(0)
    param, grad = torch.randn(40_000), torch.randn(40_000)
    expected = grad + noise.fill_(torch.empty(40_000), kind, KEY, 0.01)
    r = noise.fill_(torch.empty(40_000), kind, KEY, 0.01)
    value = noise.add_(grad, param, kind, KEY, 0.01)
    assert torch.equal(grad, expected)
    assert value == pytest.approx(torch.dot(r.double(), param.double()).item(), rel=1e-5)


def test_other_dtypes_get_the_float32_stream_scaled_in_their_dtype():
    unit = noise.fill_(torch.empty(5000), "gaussian", KEY)
    double = noise.fill_(torch.empty(5000, dtype=torch.float64), "gaussian", KEY, 1e-3)
    assert torch.equal(double, unit.double() * 1e-3)
    grad, param = torch.zeros(5000, dtype=torch.float64), torch.ones(5000, dtype=torch.float64)
    value = noise.add_(grad, param, "gaussian", KEY, 1e-3)
    assert torch.equal(grad, double)
    assert value == pytest.approx(double.sum().item(), rel=1e-12)


def test_the_torch_path_agrees_with_the_kernel(monkeypatch):
    kernel_or_skip()
    fast = noise.fill_(torch.empty(100_000), "gaussian", KEY, 0.5)
    monkeypatch.setenv(noise.ENV_SWITCH, "0")
    assert noise.kernel_status().startswith("torch operations")
    slow = noise.fill_(torch.empty(100_000), "gaussian", KEY, 0.5)
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6 * 0.5)


def test_gaussian_statistics():
    n = 1000 * noise.BLOCK
    z = noise.fill_(torch.empty(n), "gaussian", 12345).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert z.var().item() == pytest.approx(1.0, abs=0.005)
    assert ((z**4).mean() / z.var() ** 2).item() == pytest.approx(3.0, abs=0.03)  # kurtosis
    for x in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):  # the CDF against Phi
        phi = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        assert (z <= x).double().mean().item() == pytest.approx(phi, abs=0.0015)
    assert z.abs().max().item() < 5.8  # the 24-bit uniform's end of the tails
    # No correlation between neighbours, between the two halves of a pair (cosine, sine), nor
    # between the streams of two keys.
    blocks = z.view(-1, noise.BLOCK)
    for a, b in (
        (z[:-1], z[1:]),
        (blocks[:, : noise.BLOCK // 2], blocks[:, noise.BLOCK // 2 :]),
        (z, noise.fill_(torch.empty(n), "gaussian", 12346).double()),
    ):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.004
    # Squares of the pair's halves (rho^2 cos^2 + rho^2 sin^2 = rho^2 ~ chi-square(2)) are
    # uncorrelated too: the halves are independent, not just uncorrelated.
    c, s = blocks[:, : noise.BLOCK // 2].flatten(), blocks[:, noise.BLOCK // 2 :].flatten()
    assert abs(torch.corrcoef(torch.stack([c**2, s**2]))[0, 1].item()) < 0.004


def test_uniform_statistics():
    u = noise.fill_(torch.empty(1_000_000), "uniform", 99).double()
    bound = math.sqrt(3.0)
    assert -bound < u.min().item() and u.max().item() < bound
    assert u.var().item() == pytest.approx(1.0, abs=0.005)
    counts = torch.histc(u, bins=20, min=-bound, max=bound)
    assert (counts / u.numel() - 0.05).abs().max().item() < 0.002


def test_keys_are_a_pure_function_of_seed_iteration_and_tensor():
    assert noise.step_keys(0, 5, 3) == noise.step_keys(0, 5, 3)
    assert (
        len(set(noise.step_keys(0, 5, 3) + noise.step_keys(0, 6, 3) + noise.step_keys(1, 5, 3)))
        == 9
    )
    assert all(0 <= key < 1 << 64 for key in noise.step_keys(7, 0, 10))


def test_without_a_compiler_the_torch_path_runs_and_says_why(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    status = noise.kernel_status()
    assert status.startswith("torch operations (no C kernel: no C compiler")
    z = noise.fill_(torch.empty(3000), "gaussian", KEY)
    assert torch.equal(z, noise.reference(3000, "gaussian", KEY))


def test_a_failing_compiler_is_reported(fresh_kernel, monkeypatch, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert noise.kernel_status() == (
        "torch operations (no C kernel: cc failed: cc: fatal error: no input files)"
    )
    assert not list((tmp_path / "tirg-ga" / "kernels").glob("*"))  # nothing half-written left


def test_loading_the_kernel_leaves_subnormal_floats_alone():
    """-ffast-math in a shared library switches the whole process to flush-to-zero; the kernel
    is built without it, and torch's subnormal arithmetic is unchanged after loading it."""
    noise.kernel_status()
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # subnormal in float32
    assert (tiny * 0.5).item() > 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        noise.fill_(torch.empty(4), "laplace", KEY)
    with pytest.raises(ValueError, match="offset must be a multiple of 2048"):
        noise.fill_(torch.empty(4), "gaussian", KEY, offset=100)
    with pytest.raises(ValueError, match="out must be 1-D"):
        noise.fill_(torch.empty(2, 2), "gaussian", KEY)
    with pytest.raises(ValueError, match="1-D of one size"):
        noise.add_(torch.empty(4), torch.empty(5), "gaussian", KEY, 1.0)
