"""ppu_fast: Pseudo-Probability Unlearning with a fast dual-Newton refinement solver.

Public API: :func:`refine`, :func:`solve`, :func:`targets`, :class:`RefineInfo`,
:class:`ConvergenceWarning`; the host cache of CPU buffers: :func:`empty_host_cache`,
:func:`set_host_cache_limit`, :func:`host_cache_stats`; and, imported on first use,
:func:`refine_file`, :func:`unlearn`,
:class:`UnlearnResult` and :func:`finetune`. Importing the package loads torch and numpy only.
"""

from typing import TYPE_CHECKING

from .api import refine, solve, targets
from .backends.cpu import empty_host_cache, host_cache_stats, set_host_cache_limit
from .solver import ConvergenceWarning, RefineInfo

if TYPE_CHECKING:
    # What the lazy names below resolve to, for type checkers (the package ships py.typed);
    # never imported at run time.
    from .finetune import finetune
    from .stream import refine_file
    from .unlearn import UnlearnResult, unlearn

__version__ = "0.1.0"

__all__ = ["refine", "solve", "targets", "RefineInfo", "ConvergenceWarning", "refine_file",
           "unlearn", "empty_host_cache", "set_host_cache_limit", "host_cache_stats",
           "UnlearnResult", "finetune", "__version__"]

# ``unlearn`` is a callable subpackage (ppu_fast/unlearn/__init__.py): once imported, Python binds
# the package to this name, so return the package itself, which calls through to the function.
_LAZY = {"unlearn": ("ppu_fast.unlearn", None),
         "UnlearnResult": ("ppu_fast.unlearn", "UnlearnResult"),
         "finetune": ("ppu_fast.finetune", "finetune"),
         "refine_file": ("ppu_fast.stream", "refine_file")}


def __getattr__(name: str) -> object:
    # Unlearning pulls in models, data and scikit-learn: load it only when asked for.
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'ppu_fast' has no attribute {name!r}")
