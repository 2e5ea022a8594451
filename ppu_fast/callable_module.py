"""Modules that can be called as the function they are named after.

``ppu_fast.unlearn`` and ``ppu_fast.finetune`` each name both a module and the function it
defines. Importing the module binds it to the package attribute, shadowing the function that
``ppu_fast`` exported under the same name, so ``ppu_fast.finetune(...)`` would fail with "module
object is not callable" after the first ``import ppu_fast.finetune``. Making the module callable
keeps both spellings working whatever was imported first.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call is a call of its function of the same name as the module's last
    component (``ppu_fast.finetune(...)`` is ``ppu_fast.finetune.finetune(...)``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function()(*args, **kwargs)

    def _function(self) -> Any:
        return getattr(self, self.__name__.rsplit(".", 1)[-1])

    @property
    def __signature__(self) -> inspect.Signature:
        # inspect.signature (IDEs, Jupyter's "?", click-style tools) reads this before the
        # class's __call__, whose (*args, **kwargs) hides the parameters.
        return inspect.signature(self._function())


def make_callable(module_name: str) -> None:
    """Turn the loaded module ``module_name`` into a :class:`CallableModule`."""
    sys.modules[module_name].__class__ = CallableModule
