# All metadata lives in pyproject.toml; this file exists so that `FASTADAPT_BUILD_EXT=1 pip install .`
# can build the native extension ahead of time once csrc/ has one.
from setuptools import setup

setup()
