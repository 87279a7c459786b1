"""Shared test settings."""

import os

import torch

# ravine's compiled CPU step takes square roots with torch's own function here, so
# every parity test can ask for bit-equal results; tests/test_fast_path.py checks the
# default (hardware square root) separately.
os.environ.setdefault("RAVINE_EXACT_SQRT", "1")

# The tests train tiny models, for which one thread is fastest, and a shared 2-core
# machine would otherwise have torch's worker threads competing for the cores.
torch.set_num_threads(1)


# -- fixtures of the compiled steps' tests (tests/test_fast_*.py, test_compiled_muon.py) --

import pytest  # noqa: E402

import ravine.kernels.cpu  # noqa: E402


@pytest.fixture(scope="session")
def kernel():
    """Build (or load) the compiled library once per test session."""
    reason = ravine.kernels.cpu.unavailable_reason()
    if reason is not None:
        message = f"the compiled CPU step is unavailable here: {reason}"
        if os.environ.get("CI"):  # CI machines have a C++ compiler: a missing build is a failure
            pytest.fail(message)
        pytest.skip(message)
    return ravine.kernels.cpu.load()


@pytest.fixture
def exact_sqrt(kernel):
    """Square roots through torch's own function, for results bit-equal to torch's."""
    previous = ravine.kernels.cpu.exact()
    if not ravine.kernels.cpu.set_exact_sqrt(True):
        ravine.kernels.cpu.set_exact_sqrt(previous)
        pytest.skip("torch's square root function (MKL VML) is not exported by this torch build")
    yield
    ravine.kernels.cpu.set_exact_sqrt(previous)


@pytest.fixture
def hardware_sqrt(kernel):
    """The default mode, exact mode off: the hardware square root, and impl="auto" runs
    the compiled steps that are not bit-equal to torch's (LAMB, Adafactor)."""
    previous = ravine.kernels.cpu.exact()
    ravine.kernels.cpu.set_exact_sqrt(False)
    yield
    ravine.kernels.cpu.set_exact_sqrt(previous)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """torch's thread count for one test: 1 and 2, or the values of an indirect
    parametrization."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)
