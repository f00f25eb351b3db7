"""Restricted unpickling of request bodies: plain data and NumPy arrays, nothing that runs code.

flow_grpo and the frameworks that copied its reward clients POST ``pickle.dumps({"images": [...],
"prompts": [...]})``. A plain ``pickle.loads`` of a request body runs whatever callable the body names,
so the server decodes with `loads_plain`, whose unpickler imports nothing:

- Plain values need no globals at all (dict, list, tuple, str, bytes, int, float, bool, None); `set`,
  `frozenset`, `bytearray`, `complex` and protocol 2's ``_codecs.encode(text, "latin1")`` are allowed.
- NumPy arrays (``np.array_split`` prompts arrive as ``<U`` arrays) are admitted through stand-ins for
  exactly the globals NumPy's pickles name (``numpy.dtype``, ``numpy.ndarray``, ``_reconstruct``,
  ``scalar``, ``_frombuffer``, under ``numpy.core`` or ``numpy._core``). The stand-ins never hand the
  pickled state to NumPy's own ``__setstate__``: they check the dtype (booleans, integers, floats,
  complex, fixed-width ``S``/``U`` strings; no object, structured or sub-array dtypes), the shape and
  the byte count, and only then build the array with ``np.frombuffer``.
- Any other global is refused in ``find_class`` itself, before it is imported or called.

Example:
    >>> loads_plain(pickle.dumps({"images": [b"..."], "prompts": np.array(["a cat"])}))
    {'images': [b'...'], 'prompts': array(['a cat'], dtype='<U5')}
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

from reward_plugins.unpickle import RefusedGlobalError

__all__ = ["RefusedGlobalError", "loads_plain", "PLAIN_TYPES_HELP"]

PLAIN_TYPES_HELP = (
    "request pickles may hold only dicts, lists, tuples, sets, str, bytes, numbers, None and NumPy arrays "
    "of bool/int/float/complex/str dtypes"
)

# Dtype kinds an array may have: no object ('O'), void/structured ('V') or datetime kinds.
_ALLOWED_KINDS = frozenset("biufcSU")
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
_MAX_NODES = 1_000_000  # containers and arrays walked after loading (a nested-reference bomb stops here)
_MAX_DEPTH = 32  # nesting of containers; real request bodies nest 2-5 deep
_MAX_OPCODES = 200_000  # a flow_grpo body needs a few per image


def _refuse(what: str) -> RefusedGlobalError:
    return RefusedGlobalError(f"refusing {what}: {PLAIN_TYPES_HELP}. Nothing from the request was executed.")


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol 2 stores bytes as ``_codecs.encode(text, "latin1")``; admit exactly that call."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (real, imag)):
        raise _refuse(f"complex({type(real).__name__}, {type(imag).__name__})")
    return complex(real, imag)


def _real_dtype(spec: Any) -> np.dtype:
    if isinstance(spec, _Dtype):
        return spec.resolve()
    raise _refuse(f"a dtype given as {type(spec).__name__}")


class _Dtype:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` plus its BUILD state; checked, then resolved."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(spec, str) or len(spec) > 8 or not spec.isascii() or "," in spec:
            raise _refuse(f"numpy.dtype({spec!r})")
        try:
            dt = np.dtype(spec)
        except TypeError:
            raise _refuse(f"numpy.dtype({spec!r})") from None
        if dt.kind not in _ALLOWED_KINDS or dt.names is not None or dt.subdtype is not None or dt.hasobject:
            raise _refuse(f"numpy.dtype({spec!r}) (kind {dt.kind!r})")
        self._dtype = dt

    def __setstate__(self, state: Any) -> None:
        # NumPy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags).
        if not isinstance(state, tuple) or len(state) < 5:
            raise _refuse(f"a dtype state {type(state).__name__}")
        byteorder, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None:
            raise _refuse("a structured or sub-array dtype")
        if byteorder in ("<", ">"):
            self._dtype = self._dtype.newbyteorder(byteorder)
        elif byteorder not in ("|", "="):
            raise _refuse(f"dtype byte order {byteorder!r}")
        if len(state) > 5 and isinstance(state[5], int) and state[5] > 0 and state[5] != self._dtype.itemsize:
            raise _refuse(f"dtype {self._dtype} with element size {state[5]}")

    def resolve(self) -> np.dtype:
        return self._dtype


def _build_array(data: Any, dtype: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
    if isinstance(data, pickle.PickleBuffer):
        data = bytes(data.raw())
    if not isinstance(data, (bytes, bytearray)):
        raise _refuse(f"array data of type {type(data).__name__} (only raw bytes)")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape) or len(shape) > 32:
        raise _refuse(f"array shape {shape!r}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise pickle.UnpicklingError(
            f"array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes; the pickle has {len(data)}."
        )
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


class _Allowed:
    """An allowed global as the unpickler sees it: callable, but without a ``__dict__`` or attributes a
    pickle's BUILD could overwrite (so one request cannot tamper with the functions the next one uses)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Any, name: str) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setattr__(self, key: str, value: Any) -> None:
        raise _refuse(f"setting {key!r} on {self._name}")

    def __setstate__(self, state: Any) -> None:
        raise _refuse(f"setting the state of {self._name}")

    def __repr__(self) -> str:
        return self._name


class _Pending:
    """A NumPy value under construction: only `_finish` turns it into a real array or scalar, so no
    NumPy object (and no NumPy ``__setstate__``) is ever exposed to the pickle's opcodes."""

    __slots__ = ("value", "awaiting_state")

    def __init__(self, value: Any = None, awaiting_state: bool = False) -> None:
        self.value = value
        self.awaiting_state = awaiting_state

    def __setstate__(self, state: Any) -> None:
        # ndarray state after _reconstruct: (version, shape, dtype, is_fortran, rawdata); only once.
        if not self.awaiting_state:
            raise _refuse("setting the state of a finished array")
        if not isinstance(state, tuple) or len(state) != 5:
            raise _refuse(f"an array state {type(state).__name__}")
        _, shape, dtype, fortran, data = state
        self.value = _build_array(data, _real_dtype(dtype), shape, bool(fortran))
        self.awaiting_state = False


def _no_ndarray_call(*args: Any, **kwargs: Any) -> Any:
    raise _refuse("calling numpy.ndarray(...)")


_NDARRAY = _Allowed(_no_ndarray_call, "numpy.ndarray")


def _reconstruct(subtype: Any, shape: Any = (0,), typecode: Any = b"b") -> _Pending:
    if subtype is not _NDARRAY:
        raise _refuse(f"_reconstruct of {subtype!r} (only numpy.ndarray)")
    return _Pending(awaiting_state=True)


def _scalar(dtype: Any, data: Any = b"") -> _Pending:
    return _Pending(_build_array(data, _real_dtype(dtype), (), False)[()])


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> _Pending:
    if order not in ("C", "F"):
        raise _refuse(f"array order {order!r}")
    return _Pending(_build_array(buf, _real_dtype(dtype), shape, order == "F"))


def _allow(module: str, name: str, fn: Any) -> tuple[tuple[str, str], _Allowed]:
    return (module, name), (fn if isinstance(fn, _Allowed) else _Allowed(fn, f"{module}.{name}"))


_ALLOWED: dict[tuple[str, str], _Allowed] = dict(
    [
        _allow("builtins", "set", set),
        _allow("builtins", "frozenset", frozenset),
        _allow("builtins", "bytearray", bytearray),
        _allow("builtins", "complex", _complex),
        _allow("_codecs", "encode", _latin1),
        _allow("numpy", "dtype", _Dtype),
        _allow("numpy", "ndarray", _NDARRAY),
        *(_allow(m, "_reconstruct", _reconstruct) for m in _NUMPY_MODULES if m.endswith("multiarray")),
        *(_allow(m, "scalar", _scalar) for m in _NUMPY_MODULES if m.endswith("multiarray")),
        *(_allow(m, "_frombuffer", _frombuffer) for m in _NUMPY_MODULES if m.endswith("numeric")),
    ]
)


class PlainUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` imports nothing and knows only `_ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _refuse(f"the global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("a persistent id")


# Opcodes that add items to the container below them on the stack: the container keeps its place and
# its depth only grows to cover what was added (a 10 000-item list is not 10 000 deep).
_MODIFIERS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_MARK = -1


def _prescan(data: bytes) -> None:
    """Bound the opcode count and the nesting depth before anything is built.

    A few bytes of ``TUPLE1`` opcodes nest a million tuples deep, and hashing such a key (which the
    unpickler does for every dict key) overflows the C stack and kills the process. So the opcode stream
    is simulated first, tracking how deep each stack item nests, and refused past `_MAX_DEPTH`.
    """
    stack: list[int] = []
    memo: dict[Any, int] = {}

    def pop_to_mark() -> list[int]:
        i = len(stack) - 1 - stack[::-1].index(_MARK)
        items = stack[i + 1 :]
        del stack[i:]
        return items

    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(data)):
            if n >= _MAX_OPCODES:
                raise pickle.UnpicklingError(f"the pickle has more than {_MAX_OPCODES} opcodes; request bodies need far fewer.")
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                return
            if name == "MARK":
                stack.append(_MARK)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, 0))
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "POP_MARK":
                pop_to_mark()
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    # Everything after the mark (OBJ's class included) is one slice; items below it pop singly.
                    popped = pop_to_mark()
                    below = before.index(pickletools.markobject)
                else:
                    popped, below = [], len(before)
                for _ in range(below):
                    popped.insert(0, stack.pop())
                if _MARK in popped:
                    raise pickle.UnpicklingError(f"malformed pickle: {name} at a MARK.")
                if name in _MODIFIERS:
                    depth = max(popped[0], 1 + max(popped[1:], default=0))
                else:
                    depth = 1 + max(popped) if popped else 0
                if depth > _MAX_DEPTH:
                    raise pickle.UnpicklingError(f"the pickle nests deeper than {_MAX_DEPTH} levels; request bodies nest a few.")
                stack.extend([depth] * len(op.stack_after))
    except (ValueError, IndexError) as e:  # genops on a truncated stream; pops past the bottom
        raise pickle.UnpicklingError(f"not a well-formed pickle ({type(e).__name__}: {e}).") from None
    raise pickle.UnpicklingError("not a well-formed pickle (no STOP opcode).")


def _finish(obj: Any) -> Any:
    """Swap pending arrays for real ones, everywhere in the loaded tree (shared references visited once)."""
    seen: dict[int, Any] = {}
    nodes = 0

    def walk(x: Any, depth: int) -> Any:
        nonlocal nodes
        if isinstance(x, (str, bytes, bytearray, int, float, complex)) or x is None:
            return x
        if id(x) in seen:
            return seen[id(x)]
        nodes += 1
        if nodes > _MAX_NODES or depth > _MAX_DEPTH:
            raise pickle.UnpicklingError(f"the pickle nests deeper than {_MAX_DEPTH} or holds over {_MAX_NODES} containers.")
        if isinstance(x, _Pending):
            if x.awaiting_state:
                raise pickle.UnpicklingError("the pickle holds an array without its data.")
            out: Any = x.value
        elif isinstance(x, dict):
            out = {}
            seen[id(x)] = out
            for k, v in x.items():
                out[walk(k, depth + 1)] = walk(v, depth + 1)
        elif isinstance(x, list):
            out = []
            seen[id(x)] = out
            out.extend(walk(v, depth + 1) for v in x)
        elif isinstance(x, (tuple, set, frozenset)):
            out = type(x)(walk(v, depth + 1) for v in x)
        else:
            # Only the types above can come out of PlainUnpickler; anything else is a bug worth refusing.
            raise _refuse(f"an object of type {type(x).__name__}")
        seen[id(x)] = out
        return out

    return walk(obj, 0)


def loads_plain(data: bytes) -> Any:
    """Unpickle `data` admitting only plain values and NumPy arrays of non-object dtypes.

    Raises:
        RefusedGlobalError: the pickle names a class or callable outside the allow-list (nothing ran).
        pickle.UnpicklingError: the bytes are not a well-formed pickle of allowed values.
    """
    _prescan(data)
    try:
        return _finish(PlainUnpickler(io.BytesIO(data)).load())
    except pickle.UnpicklingError:
        raise
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, MemoryError) as e:
        raise pickle.UnpicklingError(f"not a well-formed pickle ({type(e).__name__}: {e}).") from None
