"""How the ``cpp`` extension is built: ahead of time by ``setup.py``, or on first use.

One place for the sources, the compiler flags and the SIMD detection, used by both build paths:

* ``setup.py`` (``pip install --no-build-isolation .``, the Makefile) loads this file by path (it
  imports nothing of the package, and torch only inside functions) and builds
  ``steerlm_kernels._C`` ahead of time.
* An install without torch at build time (``pip install .`` / ``pip install git+<url>`` with pip's
  default build isolation) has no prebuilt ``_C``; the C++ sources ship inside the package
  (``steerlm_kernels/csrc``), and :func:`jit_load` builds them on first use with
  ``torch.utils.cpp_extension.load`` (ninja) into a cache per torch and Python version:
  ``$STEERLM_KERNELS_CACHE`` or ``~/.cache/steerlm_kernels``, then ``torch-<version>-py<XY>``.
  The build takes about a minute, prints one line on stderr, and runs under a file lock so that
  several processes started together (torchrun ranks) build it once; later processes load the
  cached library in well under a second.

``STEERLM_KERNELS_SIMD=auto|avx512|avx2|none`` overrides the SIMD detection on both paths.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

#: C++ sources of the CPU extension (in ``csrc/``), and the headers they include.
CPU_SOURCES: tuple[str, ...] = ("cpu_kernels.cpp", "bindings.cpp")
CPU_HEADERS: tuple[str, ...] = ("cpu_kernels.h",)
SIMD_ENV = "STEERLM_KERNELS_SIMD"
CACHE_ENV = "STEERLM_KERNELS_CACHE"
#: Module name of the extension built on first use (the prebuilt one is ``steerlm_kernels._C``).
JIT_NAME = "steerlm_kernels_cpp"

# Compiler flags per SIMD level. CPU_CAPABILITY_* selects ATen's Vectorized<float>
# implementation (vec512 / vec256); the -m flags let the compiler emit those instructions.
SIMD_FLAGS: dict[str, list[str]] = {
    "avx512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "none": ["-DCPU_CAPABILITY=DEFAULT"],
}
CPU_FEATURES = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
                "avx2": {"avx2", "fma", "f16c"}}
BASE_CFLAGS: tuple[str, ...] = ("-O3", "-fopenmp", "-fno-math-errno")
LDFLAGS: tuple[str, ...] = ("-fopenmp",)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler() -> str | None:
    """Path of the C++ compiler (``$CXX`` or ``c++``), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _compiler_accepts(flags: list[str]) -> bool:
    """Whether the C++ compiler builds a trivial file with ``flags``."""
    cxx = compiler()
    if cxx is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text("#include <immintrin.h>\nint main() { return 0; }\n")
        cmd = [cxx, *flags, "-c", str(src), "-o", str(Path(tmp, "probe.o"))]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def simd_level() -> str:
    """``avx512``, ``avx2`` or ``none``: ``$STEERLM_KERNELS_SIMD``, else the best level that both
    the CPU and the compiler support (x86-64 only; other architectures use ATen's defaults)."""
    forced = os.environ.get(SIMD_ENV, "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in SIMD_FLAGS:
            raise ValueError(f"${SIMD_ENV} must be auto, avx512, avx2 or none; got {forced!r}")
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "none"
    cpu = _cpu_flags()
    for level in ("avx512", "avx2"):
        if CPU_FEATURES[level] <= cpu and _compiler_accepts(SIMD_FLAGS[level][:-2]):
            return level
    return "none"


def cflags(simd: str) -> list[str]:
    """C++ flags of the CPU extension at SIMD level ``simd``."""
    return [*BASE_CFLAGS, *SIMD_FLAGS[simd]]


def source_dir() -> Path | None:
    """The directory holding the C++ sources: ``steerlm_kernels/csrc`` in an installed package,
    ``csrc/`` beside the package in a source checkout (editable install); None when neither has
    them."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in CPU_SOURCES + CPU_HEADERS):
            return candidate
    return None


def cache_dir() -> Path:
    """Build directory of the extension built on first use, one per torch and Python version."""
    import torch

    root = os.environ.get(CACHE_ENV, "").strip() or os.path.join(Path.home(), ".cache", "steerlm_kernels")
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return Path(root).expanduser() / tag


def cached_library() -> Path | None:
    """The shared library a previous first-use build left in :func:`cache_dir`, if any."""
    try:
        found = sorted(cache_dir().glob(f"{JIT_NAME}*.so"))
    except OSError:
        return None
    return found[0] if found else None


def _ninja_on_path() -> bool:
    """Make ``ninja`` findable by ``torch.utils.cpp_extension`` (which runs ``ninja --version``):
    the system's, or the ``ninja`` wheel's binary directory put on ``PATH``."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # the PyPI wheel: a binary in ninja.BIN_DIR
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def jit_problem() -> str | None:
    """Why the extension cannot be built on first use here (None when it can). Cheap: builds
    nothing."""
    if source_dir() is None:
        return "the C++ sources (csrc/) are not in the package"
    if compiler() is None:
        return "no C++ compiler ($CXX or c++ on PATH)"
    if not _ninja_on_path():
        return "ninja is not installed (pip install ninja)"
    return None


def import_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its ``No CUDA runtime is found, using
    CUDA_HOME=...`` warning (logged at import by a CUDA build of torch on a machine without a GPU:
    every CPU process that loads the cached build printed it; the CPU extension needs no CUDA)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def jit_load() -> ModuleType:
    """Build the CPU extension with ``torch.utils.cpp_extension.load`` into :func:`cache_dir`
    (or load the cached build) and return the module. Several processes calling this at once
    build it once: the build holds an exclusive ``fcntl`` lock on ``<cache>/build.lock``.

    Raises:
        ImportError: the build is impossible here (:func:`jit_problem`) or failed (the compiler's
            message is in the exception).
    """
    import fcntl

    cpp_extension = import_cpp_extension()
    problem = jit_problem()
    if problem is not None:
        raise ImportError(f"cannot build the cpp extension on first use: {problem}")
    src = source_dir()
    assert src is not None
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # torch's own lock file, left behind by a build that was killed: we hold the real lock.
            (build / "lock").unlink(missing_ok=True)
            if cached_library() is None:
                print(f"steerlm_kernels: building the cpp extension on first use for torch "
                      f"{_torch_version()} into {build} (about a minute, once)", file=sys.stderr, flush=True)
            return cpp_extension.load(
                JIT_NAME, [str(src / name) for name in CPU_SOURCES],
                extra_cflags=cflags(simd_level()), extra_ldflags=list(LDFLAGS),
                build_directory=str(build), verbose=False,
            )
        except Exception as exc:
            raise ImportError(f"building the cpp extension on first use failed ({type(exc).__name__}: {exc})") \
                from exc
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _torch_version() -> str:
    import torch

    return str(torch.__version__)
