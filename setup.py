"""Builds the cffi extension ``hv_backends._hv_native`` (Unicorn backend hot hooks).

All other metadata lives in pyproject.toml.
"""
from setuptools import setup

setup(cffi_modules=["backends/native/build_native.py:ffibuilder"])
