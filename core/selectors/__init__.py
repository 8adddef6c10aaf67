"""Selectors, looked up by name. Importing this package (or any module in it) registers every built-in
selector: a new one is its own module, imported here, in the order the config's drop-down lists them."""
from sftcurate.core.selectors.base import (REGISTRY, Budget, Selector, SelectionResult, SelectorInputs, get_selector,
                                           register)
from sftcurate.core.selectors import uniform, fishersft, s2l, density, askllm  # noqa: F401,E402  (registers them)
from sftcurate.core.selectors import similarity, fishersft_target  # noqa: F401,E402  (issue 24: aim at a target)

__all__ = ["REGISTRY", "Budget", "Selector", "SelectionResult", "SelectorInputs", "get_selector", "register"]
