"""Selectors, looked up by name. Importing this package registers every selector module in it."""
import importlib
import pkgutil

from sftcurate.core.selectors.base import REGISTRY, Budget, Selector, SelectionResult, SelectorInputs, get_selector, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "Budget", "Selector", "SelectionResult", "SelectorInputs", "get_selector", "register"]
