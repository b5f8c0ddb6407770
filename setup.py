"""Build script. The package is pure Python plus a compiled extension, ``steerlm_kernels._C``
(the ``cpp`` backend, sources in ``csrc/``); metadata is in pyproject.toml.

* Every install ends with a working ``cpp`` backend. With torch importable at build time
  (``pip install --no-build-isolation .``, the Makefile) the extension is built here, ahead of
  time. Under pip's default build isolation torch is not visible here (pyproject.toml deliberately
  does not require it: an isolated build would download the multi-GB CUDA wheel and build against
  a torch other than yours); the C++ sources then ship inside the package (``steerlm_kernels/csrc``,
  copied by ``build_py`` below, always) and are built on first use, against the torch in use
  (``steerlm_kernels/kernels/cpp_build.py``, which also holds the flags and SIMD detection).
* CPU sources always; ``csrc/*.cu`` plus ``csrc/cuda_bindings.cpp`` too where a CUDA toolkit and a
  CUDA build of torch both exist. With no GPU visible and ``TORCH_CUDA_ARCH_LIST`` unset (a docker
  build, a login node, CI) the CUDA code is built for ``8.0;9.0+PTX`` (A100, H100/H200, and PTX for
  newer GPUs). If the CUDA part fails, the extension is rebuilt CPU-only: a CUDA failure never
  drops the CPU kernels. ``STEERLM_KERNELS_NO_CUDA=1`` skips the CUDA part.
* SIMD flags are chosen for the build machine: ``STEERLM_KERNELS_SIMD=auto|avx512|avx2|none``
  overrides the detection (use ``avx2`` or ``none`` to build a wheel for other machines).
* When the extension cannot be compiled at all the install still succeeds (the first use builds
  it, or ``steerlm_kernels.backends()["cpp"]`` says why it cannot). Set
  ``STEERLM_KERNELS_REQUIRE_EXT=1`` to make a failed build an error instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"
REQUIRE_ENV = "STEERLM_KERNELS_REQUIRE_EXT"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _load_cpp_build():
    """``steerlm_kernels/kernels/cpp_build.py`` loaded by path: no package import (and no torch)."""
    spec = importlib.util.spec_from_file_location(
        "_steerlm_cpp_build", ROOT / "steerlm_kernels" / "kernels" / "cpp_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cpp_build = _load_cpp_build()


def _log(msg: str) -> None:
    print(f"steerlm_kernels setup: {msg}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """build_py that also ships the C++ sources in the package (``steerlm_kernels/csrc``), for the
    build on first use of installs that had no torch at build time."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib, "steerlm_kernels", "csrc")
        target.mkdir(parents=True, exist_ok=True)
        for name in cpp_build.CPU_SOURCES + cpp_build.CPU_HEADERS:
            shutil.copy2(ROOT / CSRC / name, target / name)


def _cuda_archs(torch) -> None:
    """Set ``TORCH_CUDA_ARCH_LIST`` when no GPU is visible and it is unset (torch's detection
    would fail with 'list index out of range')."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return
    try:
        visible = torch.cuda.device_count() > 0
    except Exception:
        visible = False
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        _log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: building CUDA code for {DEFAULT_CUDA_ARCHS}")


def _cuda_home() -> None:
    """Point ``CUDA_HOME`` at a CUDA toolkit when torch would guess wrong: with no
    ``CUDA_HOME``/``CUDA_PATH`` torch takes the grandparent of the ``nvcc`` on PATH, which for a
    wrapper in ``/usr/local/bin`` is ``/usr/local`` (no ``cuda_runtime.h`` there); then use
    ``/usr/local/cuda`` or the newest ``/usr/local/cuda-*`` that has the headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or (Path(nvcc).resolve().parents[1] / "include" / "cuda_runtime.h").is_file():
        return
    candidates = [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").is_file() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            _log(f"CUDA_HOME unset and {nvcc} is not inside a toolkit: using {home}")
            return


def extension_setup() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(); only ``build_py`` when torch is not importable."""
    cmdclass: dict = {"build_py": BuildPyWithSources}
    _cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing (build isolation) or broken: built on first use
        _log(f"torch is not importable here ({type(exc).__name__}); the C++ extension will be built on "
             "first use against the torch installed then (or install with --no-build-isolation)")
        return {"cmdclass": cmdclass}

    simd = cpp_build.simd_level()
    cxx = cpp_build.cflags(simd)
    link = list(cpp_build.LDFLAGS)
    cpu_sources = [f"{CSRC}/{name}" for name in cpp_build.CPU_SOURCES]
    cpu_ext = cpp_extension.CppExtension("steerlm_kernels._C", cpu_sources, extra_compile_args=cxx,
                                         extra_link_args=link)
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cuda = cuda and os.environ.get("STEERLM_KERNELS_NO_CUDA", "0") in ("", "0")
    _log(f"SIMD level {simd}; CUDA sources {'on' if cuda else 'off'}")
    ext = cpu_ext
    if cuda:
        _cuda_archs(torch)
        sources = cpu_sources + sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cu"))
        sources.append(f"{CSRC}/cuda_bindings.cpp")
        ext = cpp_extension.CUDAExtension(
            "steerlm_kernels._C", sources,
            extra_compile_args={"cxx": cxx + ["-DSK_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=link,
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension whose CUDA failure falls back to the CPU sources, and whose failure
        leaves a pure-Python install (the extension is then built on first use)."""

        def run(self) -> None:
            try:
                super().run()
                return
            except Exception as exc:
                if ext is cpu_ext:
                    self._give_up(exc)
                    return
                _log(f"WARNING: the CUDA part of the extension failed to build ({exc}); "
                     "rebuilding with the CPU sources only")
            # the same Extension object (setuptools has annotated it), with the CPU-only settings
            for attr in ("sources", "include_dirs", "define_macros", "library_dirs", "libraries",
                         "runtime_library_dirs", "extra_objects", "extra_compile_args", "extra_link_args"):
                setattr(ext, attr, getattr(cpu_ext, attr))
            self.compiler = None  # run() made a compiler object of the name; let it make a fresh one
            try:
                super().run()
            except Exception as exc:
                self._give_up(exc)

        def _give_up(self, exc: Exception) -> None:
            if os.environ.get(REQUIRE_ENV, "0") not in ("", "0"):
                raise exc
            _log(f"WARNING: the C++ extension failed to build ({exc}); it will be built on first use "
                 f"(set {REQUIRE_ENV}=1 to make this an error)")

    cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)
    return {"ext_modules": [ext], "cmdclass": cmdclass}


setup(**extension_setup())
