"""The restricted unpickler of the reward server: plain data and NumPy arrays pass, everything else is refused
before it runs."""

import io
import os
import pickle
import pickletools

import numpy as np
import pytest

from reward_plugins.serving.safe_pickle import _ALLOWED, RefusedGlobalError, loads_plain


def _sample():
    return {
        "images": [b"\xff\xd8jpeg\x00", bytearray(b"png")],
        "prompts": np.array_split(np.array(["a cat", "a dog on a sofa", "x"]), 2)[0],
        "meta_datas": [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}],
        "only_strict": False,
        "f4": np.float32(1.5),
        "i8": np.int64(-3),
        "matrix": np.arange(12.0).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "big_endian": np.arange(4, dtype=">i4"),
        "bytes_array": np.array([b"ab", b"c"]),
        "bools": np.array([True, False]),
        "complex": (1 + 2j, np.complex64(3 - 1j)),
        "set": {1, 2}, "frozen": frozenset({"a"}), "none": None, "nested": ((1, [2.5]),),
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_values_and_numpy_arrays_round_trip(protocol):
    obj = _sample()
    out = loads_plain(pickle.dumps(obj, protocol=protocol))
    assert set(out) == set(obj)
    for key, value in obj.items():
        got = out[key]
        if isinstance(value, np.ndarray):
            assert isinstance(got, np.ndarray) and got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
        elif isinstance(value, np.generic):
            assert type(got) is type(value) and got == value
        elif key == "complex":
            assert got[0] == value[0] and got[1] == value[1]
        else:
            assert got == value
    assert out["prompts"].tolist() == ["a cat", "a dog on a sofa"]


def test_shared_references_are_kept_not_expanded():
    inner = [b"x" * 10] * 10
    outer = [inner] * 10
    out = loads_plain(pickle.dumps({"a": outer}))
    assert out["a"][0] is out["a"][9] and len(out["a"][0]) == 10


class _RunsACommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_reduce_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "pwned"
    body = pickle.dumps({"images": [b"x"], "prompts": [_RunsACommand(target)]})
    with pytest.raises(RefusedGlobalError, match=r"refusing the global (posix|os)\.system.*Nothing .* executed"):
        loads_plain(body)
    assert not target.exists()


@pytest.mark.parametrize(
    "payload, pattern",
    [
        ({"f": os.getcwd}, r"refusing the global (posix|os)\.getcwd"),
        ({"f": eval}, r"refusing the global builtins\.eval"),
        ({"f": np.load}, r"refusing the global numpy\.load"),
        ({"a": np.array([1, "x"], dtype=object)}, r"numpy\.dtype\('O8'\)"),
        ({"a": np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])}, r"numpy\.dtype\('V8'\)"),
        ({"a": np.dtype("f4")}, r"an object of type _Dtype"),
    ],
)
def test_any_other_global_or_object_dtype_is_refused(payload, pattern):
    with pytest.raises(RefusedGlobalError, match=pattern):
        loads_plain(pickle.dumps(payload))


def test_allowed_globals_cannot_be_tampered_with_by_build():
    # A hand-written pickle: push `builtins.set`, then BUILD it with a slot state that would overwrite
    # an attribute for every later request.
    body = b"\x80\x04cbuiltins\nset\n(N}\x8c\x05_name\x8c\x04evilstb."
    pickletools.dis(body, out=io.StringIO())  # a well-formed pickle
    with pytest.raises(RefusedGlobalError, match="setting the state of builtins.set"):
        loads_plain(body)
    assert repr(_ALLOWED[("builtins", "set")]) == "builtins.set"
    assert loads_plain(pickle.dumps({1, 2})) == {1, 2}


@pytest.mark.parametrize("body", [b"", b"not a pickle", b"\x80\x04\x95", pickle.dumps([1, 2])[:-3]])
def test_malformed_bytes_raise_unpickling_error(body):
    with pytest.raises(pickle.UnpicklingError):
        loads_plain(body)


def test_array_with_wrong_byte_count_is_refused():
    good = pickle.dumps(np.arange(4, dtype=np.int32), protocol=2)
    # Shrink the shape (4,) -> (3,): 12 bytes needed, 16 given.
    bad = good.replace(b"K\x04\x85", b"K\x03\x85", 1)
    assert bad != good
    with pytest.raises(pickle.UnpicklingError, match="needs 12 bytes"):
        loads_plain(bad)


def test_deep_nesting_is_refused_before_it_is_built():
    # A million nested tuples in 1 MB: hashing one as a dict key would overflow the C stack.
    bomb = b"\x80\x04}N" + b"\x85" * 1_000_000 + b"K\x01s."
    with pytest.raises(pickle.UnpicklingError, match="nests deeper than 32"):
        loads_plain(bomb)
    nested = [1]
    for _ in range(40):
        nested = [nested]
    with pytest.raises(pickle.UnpicklingError, match="nests deeper than 32"):
        loads_plain(pickle.dumps({"images": nested}))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_long_flat_containers_are_not_deep(protocol):
    flat = {"prompts": [f"p{i}" for i in range(20_000)], "d": {i: i for i in range(5000)}}
    assert loads_plain(pickle.dumps(flat, protocol=protocol)) == flat


def test_too_many_opcodes_are_refused():
    with pytest.raises(pickle.UnpicklingError, match="more than 200000 opcodes"):
        loads_plain(pickle.dumps(list(range(250_000)), protocol=0))


def test_an_old_protocol_instance_is_refused_as_a_global():
    body = b"(cos\nsystem\nS'touch /tmp/x'\no."  # protocol 0 OBJ: MARK, class, args
    with pytest.raises(RefusedGlobalError, match=r"refusing the global os\.system"):
        loads_plain(body)
