import numpy as np
import pytest

from closedloop.core.validation import check_array, check_integer_array


def test_check_array_shapes_and_dtypes():
    assert check_array("x", [[1, 2]], shape=(None, 2)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"'x' must have shape \(n,\), but got \(1, 2\)"):
        check_array("x", [[1, 2]], shape=(None,))
    with pytest.raises(TypeError, match=r"'x' must have dtype uint8, but got int64; convert it with .astype\(np.uint8\)"):
        check_array("x", np.zeros(2, np.int64), shape=(2,), dtype=np.uint8)


def test_check_integer_array_ranges_and_kinds():
    assert check_integer_array("c", np.array([1, 2], np.uint16), shape=(2,), minimum=1).dtype == np.int64
    with pytest.raises(TypeError, match=r"'c' must hold integers, but got dtype float64"):
        check_integer_array("c", [1.5], shape=(1,))
    with pytest.raises(TypeError, match=r"'c' must hold integers, but got dtype bool"):
        check_integer_array("c", [True], shape=(1,))
    with pytest.raises(ValueError, match=r"'c' must lie in \[1, 3\], but got \[0, 4\]"):
        check_integer_array("c", [0, 2, 4], shape=(3,), minimum=1, maximum=3)
