"""Build script. The package is pure Python plus an optional compiled extension
(`steerlm_kernels._C`, added by the C++ backend); see pyproject.toml for metadata."""

from setuptools import setup

setup()
