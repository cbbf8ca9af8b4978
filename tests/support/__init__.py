"""Test-side support code: an emulated Kubernetes API (`kube_emulator`) and stand-ins for the
controllers a real cluster runs (`standins`).

Imported from tests as ``support`` (``from support.kube_emulator import Emulator``): tests/ is on
sys.path under pytest (see tests/operator/conftest.py). There is no tests/__init__.py on purpose.
"""
