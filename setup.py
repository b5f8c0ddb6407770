"""Build script. The package is pure Python plus an optional compiled extension,
``steerlm_kernels._C`` (the ``cpp`` backend, sources in ``csrc/``); metadata is in pyproject.toml.

* The extension is built with ``torch.utils.cpp_extension`` (ninja when available) whenever torch
  is importable at build time: build with ``pip install --no-build-isolation .`` so that the
  installed torch is used (pyproject.toml deliberately does not require torch).
* CPU sources always; ``csrc/*.cu`` plus ``csrc/cuda_bindings.cpp`` only where a CUDA toolkit
  and a CUDA build of torch both exist.
* SIMD flags are chosen for the build machine (the extension is built where it runs):
  ``STEERLM_KERNELS_SIMD=auto|avx512|avx2|none`` overrides the detection.
* The extension is optional: when it cannot be compiled the install still succeeds, and
  ``steerlm_kernels.backends()["cpp"]`` says why it is missing. Set
  ``STEERLM_KERNELS_REQUIRE_EXT=1`` to make a failed build an error instead.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/cpu_kernels.cpp", f"{CSRC}/bindings.cpp"]
SIMD_ENV = "STEERLM_KERNELS_SIMD"
REQUIRE_ENV = "STEERLM_KERNELS_REQUIRE_EXT"

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


def _log(msg: str) -> None:
    print(f"steerlm_kernels setup: {msg}", file=sys.stderr)


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler_accepts(flags: list[str]) -> bool:
    """Whether the C++ compiler builds a trivial file with ``flags``."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text("#include <immintrin.h>\nint main() { return 0; }\n")
        cmd = [cxx, *flags, "-c", str(src), "-o", str(Path(tmp, "probe.o"))]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def simd_level() -> str:
    """``avx512``, ``avx2`` or ``none``: the env override, else the best level that both the
    CPU and the compiler support (x86-64 only; other architectures use ATen's defaults)."""
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


def extension_setup() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(), or {} when torch is not importable."""
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing or broken: pure-Python install
        _log(f"torch is not importable ({exc}); building without the C++ extension")
        return {}

    simd = simd_level()
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", *SIMD_FLAGS[simd]]
    link = ["-fopenmp"]
    sources = list(CPU_SOURCES)
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cuda = cuda and os.environ.get("STEERLM_KERNELS_NO_CUDA", "0") in ("", "0")
    _log(f"SIMD level {simd}; CUDA sources {'on' if cuda else 'off'}")
    if cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cu"))
        sources.append(f"{CSRC}/cuda_bindings.cpp")
        ext = cpp_extension.CUDAExtension(
            "steerlm_kernels._C", sources,
            extra_compile_args={"cxx": cxx + ["-DSK_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("steerlm_kernels._C", sources, extra_compile_args=cxx,
                                         extra_link_args=link)

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension whose failure leaves a working pure-Python install."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                if os.environ.get(REQUIRE_ENV, "0") not in ("", "0"):
                    raise
                _log(f"WARNING: the C++ extension failed to build ({exc}); the 'cpp' backend "
                     f"will be unavailable (set {REQUIRE_ENV}=1 to make this an error)")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**extension_setup())
