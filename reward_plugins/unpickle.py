"""Restricted unpickling of whole pickled modules (the MPS checkpoint) into a flat state dict.

`torch.load(path)` of a pickled `nn.Module` imports and runs whatever the pickle names: here the
official `trainer.models.*` classes, which nobody has installed, and in a hostile file anything at all.
This unpickler runs none of it:

- Tensors, storages and parameters are rebuilt by torch's own rebuild functions, and a few plain
  containers and values (`OrderedDict`, `set`, `torch.Size`, dtypes ...) are allowed (`ALLOWED_GLOBALS`).
- Classes under `STUB_MODULES` (the official `trainer.models.*`, transformers' CLIP classes and
  configs, `torch.nn.modules.*`) are replaced by an inert `PickledObject` that only stores its pickled
  `__dict__`; nothing is imported from those modules and none of their code runs.
- Any other global is replaced by a refusing stand-in: referencing it is harmless (a pickled module
  may hold a function reference such as `GELUActivation.act`), but calling or instantiating it raises
  `RefusedGlobalError` before anything executes. So a pickle that would call `os.system` fails there.

`load_module_state_dict` then walks the stubs' `_parameters`, `_buffers` and `_modules` into the state
dict `nn.Module.state_dict()` would have produced (persistent buffers only, unless asked).

Example:
    >>> sd = load_module_state_dict("MPS_overall_checkpoint.pth")
    >>> sorted(sd)[:2]
    ['cross_model.layers.0.0.fn.ff.0.weight', 'cross_model.layers.0.0.fn.ff.2.weight']
"""

from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch._tensor
import torch._utils

# Module paths whose classes are rebuilt as inert `PickledObject`s (module trees and their configs).
STUB_MODULES: tuple[str, ...] = (
    "trainer.models",
    "transformers.models.clip",
    "transformers.activations",
    "transformers.configuration_utils",
    "transformers.generation.configuration_utils",
    "torch.nn.modules",
)

_DTYPE_NAMES = (
    "float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16", "int32", "int64",
    "uint8", "bool", "long", "int", "complex64", "complex128",
)


class RefusedGlobalError(pickle.UnpicklingError, ValueError):
    """A pickle tried to call something outside the allow-list; nothing was executed.

    Also a `ValueError`: a refused file is bad user input, reported in one line by the CLI.
    """


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles store `bytes` as ``_codecs.encode(text, "latin1")``; allow exactly that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedGlobalError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 is allowed.")
    return text.encode("latin1")


# Callables and values that may run or appear during unpickling. Every entry is torch's own tensor
# reconstruction or a plain container; none of them can reach the file system or run code.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch._tensor", "Tensor"): torch.Tensor,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("_codecs", "encode"): _latin1_bytes,
    **{("torch", n): getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)},
}


class PickledObject:
    """Inert stand-in for a pickled instance of an allowed class: keeps its state, runs none of its code.

    Attributes:
        pickled_class: ``"module.Name"`` of the class the pickle named.
    """

    pickled_class: str = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Instances come from NEWOBJ + BUILD (state only). A call with arguments would be a constructor
        # call, which could run arbitrary code in the real class: refuse it.
        raise RefusedGlobalError(
            f"the pickle calls {self.pickled_class}(...) with arguments; only rebuilding stored module state "
            "is allowed. Nothing was executed."
        )

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if isinstance(state, Mapping):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_pickled_state"] = state
        if isinstance(slots, Mapping):
            self.__dict__.update(slots)

    def __repr__(self) -> str:
        return f"<PickledObject {self.pickled_class}>"


def _refused(path: str) -> type:
    """A class that raises as soon as the pickle calls or instantiates `path`."""

    def new(cls, *args: Any, **kwargs: Any):
        raise RefusedGlobalError(
            f"refusing to call {path} while unpickling: it is not on the allow-list of "
            "reward_plugins.unpickle (tensor rebuilds, plain containers and inert stand-ins for module "
            "classes). Nothing from this file was executed. If the file is one of yours, re-save it as a "
            "state dict (`torch.save(module.state_dict(), path)`)."
        )

    return type(f"Refused<{path}>", (), {"__new__": new, "__slots__": (), "refused_global": path})


def _in_stub_module(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in STUB_MODULES)


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` imports nothing: allowed objects, inert stubs or refusals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles written by Python 2-compatible picklers name `__builtin__.set` etc.;
        # map them as pickle's own find_class does (fix_imports), without importing anything.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        path = f"{module}.{name}"
        if path not in self._classes:
            if _in_stub_module(module) and name.isidentifier():
                self._classes[path] = type(name, (PickledObject,), {"pickled_class": path})
            else:
                self._classes[path] = _refused(path)
        return self._classes[path]


def _restricted_load(file, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What `torch.load(pickle_module=...)` needs: `Unpickler` for the object, `load` for legacy headers.
restricted_pickle = types.SimpleNamespace(__name__="reward_plugins.unpickle", Unpickler=RestrictedUnpickler,
                                          load=_restricted_load)


def load_restricted(path: str | os.PathLike) -> Any:
    """Unpickle a torch file with `RestrictedUnpickler` (CPU tensors). Returns the stub tree or mapping.

    Raises:
        FileNotFoundError: no such file.
        RefusedGlobalError: the file would call something outside the allow-list (nothing ran); names the file.
        CheckpointError: (a ValueError) the file is truncated, corrupt or not a pickle at all.
    """
    from .checkpoints import invalid_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    try:
        # weights_only=False is what lets a custom pickle_module be used; that module is the restriction.
        return torch.load(str(path), map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except RefusedGlobalError as e:
        raise RefusedGlobalError(f"{path}: {e}") from None
    except RuntimeError as e:
        if "pickle_module" in str(e):
            raise RuntimeError(
                f"cannot read {path} with the restricted unpickler: {e}. Unset TORCH_FORCE_WEIGHTS_ONLY_LOAD, "
                "which forbids custom unpicklers (this one executes no pickled code)."
            ) from None
        raise invalid_checkpoint(path, e) from None
    except Exception as e:  # noqa: BLE001  a hostile or garbage file can make the unpickler fail in any way
        raise invalid_checkpoint(path, e) from None


def module_state_dict(obj: Any, *, include_non_persistent: bool = False) -> dict[str, torch.Tensor]:
    """Flatten an unpickled module tree (stubs with `_parameters`/`_buffers`/`_modules`) to a state dict.

    Raises:
        ValueError: `obj` is not a module tree.
    """
    if not isinstance(obj, PickledObject) or "_modules" not in obj.__dict__:
        raise ValueError(
            f"expected a pickled nn.Module (an object with _parameters/_buffers/_modules); got {obj!r}."
        )
    out: dict[str, torch.Tensor] = {}

    def walk(node: PickledObject, prefix: str) -> None:
        state = node.__dict__
        skip = set(state.get("_non_persistent_buffers_set") or ()) if not include_non_persistent else set()
        for group in ("_parameters", "_buffers"):
            for name, t in (state.get(group) or {}).items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{prefix}{name} in {node.pickled_class} is {type(t).__name__}, not a tensor.")
                out[prefix + name] = t.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            if not isinstance(child, PickledObject):
                raise ValueError(f"submodule {prefix}{name} was not rebuilt as a module ({child!r}).")
            walk(child, f"{prefix}{name}.")

    walk(obj, "")
    return out


def load_module_state_dict(path: str | os.PathLike, *, include_non_persistent: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a pickled whole `nn.Module` (or of a plain pickled state dict), running no pickled code.

    Args:
        path: the `torch.save`d file.
        include_non_persistent: also return non-persistent buffers the pickle carries (e.g. cached tables).

    Raises:
        FileNotFoundError: no such file.
        RefusedGlobalError: the file would call something outside the allow-list (nothing ran).
        ValueError: the file holds neither a module nor a state dict.

    Example:
        >>> sd = load_module_state_dict("MPS_overall_checkpoint.pth")   # keys model.*, cross_model.*
    """
    obj = load_restricted(path)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v.detach() for k, v in obj.items()}
    if isinstance(obj, PickledObject):
        return module_state_dict(obj, include_non_persistent=include_non_persistent)
    raise ValueError(
        f"{path} holds {type(obj).__name__}, neither a pickled nn.Module nor a state dict of tensors."
    )
