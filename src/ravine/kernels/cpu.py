"""The compiled CPU steps: building, loading and calling the C++ files of this folder.

``cpu_step.cpp`` holds the element-wise families (SGD, Adam, ...); other files hold
steps that are not element-wise (one per optimizer, each with its own entry point),
and ``common.h`` what they share. They are compiled together into one library.
The kernels are plain C++ with no dependency on torch's headers, so they compile in
seconds with the system compiler (``c++``, or ``$CXX``) and is called through
:mod:`ctypes`. It is built on first use into torch's extension directory
(``~/.cache/torch_extensions``, or ``$TORCH_EXTENSIONS_DIR``), under a name that
hashes the source, the compiler flags and the CPU, and loaded from there afterwards.
Hyperparameters are arguments of every call, so a learning rate that changes every
step never rebuilds anything.

The build uses ``-O3 -march=native`` (the cache key includes the CPU's flags) with
``-ffp-contract=off``, and OpenMP (the same ``libgomp`` torch has loaded). Every
operation rounds as torch's does (see the comment at the top of ``cpu_step.cpp``),
except square roots: by default the hardware's (correctly rounded), which can differ
from torch's (MKL's VML) in the last bit; :func:`set_exact_sqrt` or
``RAVINE_EXACT_SQRT=1`` takes them through torch's own function, looked up in
``libtorch_cpu``, and results are then bit-equal to torch.optim's for-loop path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["KernelUnavailable", "load", "exact", "unavailable_reason", "build_info", "set_exact_sqrt", "step"]

HERE = Path(__file__).parent
SOURCE = HERE / "cpu_step.cpp"


def _sources() -> list[Path]:
    """Every C++ file compiled into the library, in a fixed order."""
    return sorted(HERE.glob("*.cpp"))


def _headers() -> list[Path]:
    return sorted(HERE.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ABI_VERSION = 1

FAMILIES = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3, "adamax": 4, "nadam": 5, "radam": 6, "lion": 7, "signum": 8, "sfadamw": 9, "sfsgd": 10}
DTYPES = {torch.float32: 0, torch.float64: 1}


class KernelUnavailable(RuntimeError):
    """The compiled CPU step cannot be used here; the message says why."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
#: How the library was obtained in this process: compiles (0 or 1), seconds spent
#: compiling, seconds spent loading, the file, and whether torch's VML square root
#: was found (bit-equal results) or std::sqrt is used.
_info: dict = {"compiles": 0, "compile_seconds": 0.0, "load_seconds": 0.0, "path": None, "vml_sqrt": False}


def build_info() -> dict:
    """What loading the kernel cost in this process (see ``_info``)."""
    return dict(_info)


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _library_path(compiler: str) -> Path:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    sources = [path.read_bytes() for path in (*_sources(), *_headers())]
    for part in (*sources, " ".join(FLAGS).encode(), version.encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root) / f"ravine_cpu_step_{key.hexdigest()[:16]}" / "ravine_cpu_step.so"


def _compile(compiler: str, target: Path) -> None:
    """Compile every source to an object file, several at once (one per core), then
    link them into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    compile_flags = [flag for flag in FLAGS if flag != "-shared"]
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects = [Path(scratch) / f"{source.stem}.o" for source in _sources()]
        commands = [
            [compiler, *compile_flags, "-c", str(source), "-o", str(obj)] for source, obj in zip(_sources(), objects)
        ]
        def run(command: list[str]) -> str | None:
            """None when ``command`` compiled its file, else why not."""
            name = Path(command[-3]).name
            try:
                result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as error:
                return f"{name}: {error}"
            return None if result.returncode == 0 else f"{name}: {result.stderr.strip()[-2000:]}"

        with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
            failures = [failure for failure in pool.map(run, commands) if failure is not None]
        if failures:
            raise KernelUnavailable(f"compiling with {compiler} failed: {' | '.join(failures)}")
        # Link to a temporary name and rename, so concurrent builds never see half a file.
        temporary = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, objects), "-o", str(temporary)], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            raise KernelUnavailable(f"linking with {compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, target)


def _vml_sqrt() -> tuple[int | None, int | None]:
    """Addresses of MKL's vmsSqrt/vmdSqrt inside libtorch_cpu, if it exports them."""
    torch_lib = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = torch_lib / name
        if path.exists():
            try:
                handle = ctypes.CDLL(str(path))
                return (
                    ctypes.cast(handle.VMSSQRT_, ctypes.c_void_p).value,
                    ctypes.cast(handle.VMDSQRT_, ctypes.c_void_p).value,
                )
            except (OSError, AttributeError):
                return None, None
    return None, None


def _load() -> ctypes.CDLL:
    if os.environ.get("RAVINE_DISABLE_KERNELS"):
        raise KernelUnavailable("disabled by the RAVINE_DISABLE_KERNELS environment variable")
    if not SOURCE.exists():
        raise KernelUnavailable(f"the kernel source {SOURCE} is missing from the installation")
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("no C++ compiler found (set CXX, or install g++ or clang++)")
    path = _library_path(compiler)
    if not path.exists():
        start = time.perf_counter()
        _compile(compiler, path)
        _info["compiles"] += 1
        _info["compile_seconds"] += time.perf_counter() - start
    start = time.perf_counter()
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise KernelUnavailable(f"loading {path} failed: {error}") from error
    if library.ravine_abi_version() != ABI_VERSION:
        raise KernelUnavailable(f"{path} has ABI version {library.ravine_abi_version()}, expected {ABI_VERSION}")
    library.ravine_step.restype = None
    library.ravine_step.argtypes = [
        ctypes.c_int64,  # family
        ctypes.c_int64,  # dtype
        ctypes.c_int64,  # number of items
        ctypes.c_void_p,  # items
        ctypes.c_void_p,  # pointers
        ctypes.c_int64,  # slots per tensor
        ctypes.c_void_p,  # per-tensor scalars
        ctypes.c_int64,  # scalars per tensor
        ctypes.c_void_p,  # hyperparameters
        ctypes.c_int64,  # flags
        ctypes.c_int64,  # threads
    ]
    library.ravine_set_sqrt.restype = None
    library.ravine_set_sqrt.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    _apply_sqrt(library)
    _info["load_seconds"] = time.perf_counter() - start
    _info["path"] = str(path)
    return library


#: Whether square roots go through torch's own function (MKL's VML), which makes
#: every result bit-equal to torch.optim's for-loop path; off by default, because the
#: hardware square root (correctly rounded, so within one unit in the last place of
#: VML's) lets a step run in one loop and is much faster. RAVINE_EXACT_SQRT=1 turns it on.
_exact_sqrt = bool(os.environ.get("RAVINE_EXACT_SQRT"))


def _apply_sqrt(library: ctypes.CDLL) -> None:
    f32, f64 = _vml_sqrt() if _exact_sqrt else (None, None)
    library.ravine_set_sqrt(f32, f64)
    _info["vml_sqrt"] = f32 is not None and f64 is not None


def set_exact_sqrt(enabled: bool) -> bool:
    """Take square roots with torch's own function (bit-equal results) or the
    hardware's (faster); returns whether torch's is in use."""
    global _exact_sqrt
    _exact_sqrt = bool(enabled)
    if _library is not None:
        _apply_sqrt(_library)
    return _info["vml_sqrt"] if _library is not None else _exact_sqrt


def exact() -> bool:
    """Whether results must be bit-equal to torch.optim's (``RAVINE_EXACT_SQRT=1`` or
    :func:`set_exact_sqrt`). Compiled steps that cannot be bit-equal (their norms are
    summed in another order than torch's) leave the work to the plain path then."""
    return _exact_sqrt


def load() -> ctypes.CDLL:
    """The compiled library, building it on first use; raises :class:`KernelUnavailable`."""
    global _library, _failure
    if _library is not None:
        return _library
    with _lock:
        if _library is None:
            if _failure is not None:
                raise KernelUnavailable(_failure)
            try:
                _library = _load()
            except KernelUnavailable as error:
                _failure = str(error)
                raise
    return _library


def unavailable_reason() -> str | None:
    """Why the compiled step cannot be used (``None`` when it can); builds it if needed."""
    try:
        load()
    except KernelUnavailable as error:
        return str(error)
    return None


def step(family: int, dtype: int, items, pointers, per_tensor, hyperparameters, flags: int, threads: int) -> None:
    """One call of the kernel; array arguments are C-contiguous numpy arrays."""
    _library.ravine_step(
        family,
        dtype,
        items.shape[0],
        items.ctypes.data,
        pointers.ctypes.data,
        pointers.shape[1],
        per_tensor.ctypes.data,
        per_tensor.shape[1],
        hyperparameters.ctypes.data,
        flags,
        threads,
    )
