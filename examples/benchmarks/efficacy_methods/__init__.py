"""The efficacy benchmark's methods, one module per family; importing the package registers them all.

Registration order is the table's order. A new family is a new module here plus one import line below.
"""

from . import best_of_n, dpo, flow, gradient, policy_gradient, rwr, targeting  # noqa: F401  (registers the methods)
from .registry import DIMS, METHODS, TARGET_GAIN, Context, MethodSpec, evaluate, load_base, method

__all__ = ["DIMS", "METHODS", "TARGET_GAIN", "Context", "MethodSpec", "evaluate", "load_base", "method"]
