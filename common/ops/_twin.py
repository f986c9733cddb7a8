"""Loading a Triton kernel module a second time under Triton's interpreter (``TRITON_INTERPRET=1``).

Triton reads that variable when a module's kernels are defined, so a module first imported without
it (the usual case: CUDA machines, the CPU test suite) cannot run its kernels on CPU tensors. Its
interpreted twin, the same file executed again as another module with the variable set, can: the
kernel modules hand CPU calls to their twin (slow; for tests and debugging at small shapes).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["interpreted_twin"]


def interpreted_twin(name: str, file: str, package: str | None) -> ModuleType:
    """The module at ``file`` loaded as ``name`` with ``TRITON_INTERPRET=1`` (once; then cached in
    ``sys.modules``). ``package`` is the original module's ``__package__``, for its relative imports."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod
