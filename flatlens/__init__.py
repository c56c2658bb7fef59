"""flatlens: train quantization-aware and domain-generalizing networks and measure their loss surface.

The public API a notebook uses is re-exported here lazily (importing :mod:`flatlens` does not import
torch-heavy submodules until an attribute is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_checkpoint": ("flatlens.checkpoint", "load_checkpoint"),
    "Config": ("flatlens.config", "Config"),
    "load_config": ("flatlens.config", "load_config"),
    "FlatlensError": ("flatlens.errors", "FlatlensError"),
    "Objective": ("flatlens.measure.objective", "Objective"),
    "hessian": ("flatlens.measure.hessian", None),
    "landscape": ("flatlens.measure.landscape", None),
    "store": ("flatlens.store", None),
}
"""name -> (module, attribute); attribute None re-exports the module itself (``fl.hessian``, ``fl.store``)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'flatlens' has no attribute {name!r}")
