"""The sender selects the sampled slots of the staging buffer by a slice when it can (NumPy views,
copied once by encode) and by fancy indexing otherwise; both must select the same rows."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("zmq")

from grokwatch.agent.sender import _as_slice  # noqa: E402


@pytest.mark.parametrize("keep, expected", [
    ([0, 4, 8, 12], slice(0, 13, 4)),  # one slot per row (D = 4)
    ([0, 1, 2], slice(0, 3, 1)),  # packed rows, every document slot used
    ([5], slice(5, 6)),
    ([0, 1, 4, 5, 6], None),  # packed rows with fewer documents: fancy indexing
    ([0, 4, 9], None),
])
def test_sampled_slots_as_a_slice_select_the_same_rows(keep, expected):
    rows = _as_slice(keep)
    if expected is None:
        assert rows == keep
    else:
        assert rows == expected
    table = np.arange(16 * 3 * 2, dtype=np.float32).reshape(16, 3, 2)
    np.testing.assert_array_equal(table[rows], table[keep])
    np.testing.assert_array_equal(table[rows, 1:], table[keep][:, 1:])
