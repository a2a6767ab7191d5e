"""RowArgmax against torch.argmax: the first index of each row's maximum, on any number of threads."""

from __future__ import annotations

import pytest
import torch

from segscope.models.ops.argmax import RowArgmax


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [0, 1, 1023, 5001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_argmax_equals_torch_argmax(threads: int, rows: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(rows)
    scores = torch.randn(rows, 37, generator=generator, dtype=dtype)
    out = torch.full((rows,), -1, dtype=torch.int64)
    with RowArgmax(threads) as row_argmax:
        assert row_argmax(scores, out) is out
    assert torch.equal(out, scores.argmax(1))


def test_row_argmax_takes_the_first_of_tied_maxima_and_the_first_nan() -> None:
    """Ties (rounded scores repeat) go to the lowest index, as torch's; a NaN wins, as in torch."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3000, 16), generator=generator).float()
    scores[7, [3, 9]] = float("nan")
    out = torch.empty(3000, dtype=torch.int64)
    with RowArgmax(2) as row_argmax:
        row_argmax(scores, out)
    assert torch.equal(out, scores.argmax(1))
    assert int(out[7]) == 3


def test_row_argmax_reads_rows_of_a_wider_buffer() -> None:
    """Rows need only be contiguous: a slice of a larger matrix's first rows works."""
    scores = torch.randn(4000, 20, generator=torch.Generator().manual_seed(1))
    out = torch.empty(3000, dtype=torch.int64)
    with RowArgmax(2) as row_argmax:
        row_argmax(scores[:3000], out)
    assert torch.equal(out, scores[:3000].argmax(1))


@pytest.mark.parametrize(
    "scores, out, message",
    [
        (torch.zeros(8, 5).t(), torch.empty(5, dtype=torch.int64), "contiguous rows"),
        (torch.zeros(8, 5).half(), torch.empty(8, dtype=torch.int64), "float32/float64"),
        (torch.zeros(8), torch.empty(8, dtype=torch.int64), "matrix"),
        (torch.zeros(8, 5), torch.empty(7, dtype=torch.int64), "int64 vector of 8"),
        (torch.zeros(8, 5), torch.empty(8, dtype=torch.int32), "int64 vector of 8"),
    ],
)
def test_row_argmax_names_what_is_wrong(scores, out, message: str) -> None:
    with RowArgmax(1) as row_argmax, pytest.raises(ValueError, match=message):
        row_argmax(scores, out)
