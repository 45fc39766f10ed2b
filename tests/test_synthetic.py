"""The synthetic key and query generators: sizes, and arguments checked on the call."""

from __future__ import annotations

import numpy as np
import pytest

from levstream.synthetic import attention_like_keys, attention_like_queries


def test_keys_come_in_chunks_of_the_requested_rows():
    chunks = list(attention_like_keys(10_000, 16, chunk_rows=4096, seed=3))
    assert [c.shape for c in chunks] == [(4096, 16), (4096, 16), (1808, 16)]
    again = np.vstack(list(attention_like_keys(10_000, 16, chunk_rows=1000, seed=3)))
    assert again.shape == (10_000, 16)  # the chunking changes the draws, not the sizes
    assert list(attention_like_keys(0, 4)) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 10, "chunk_rows": 0}, "chunk_rows must be >= 1; got 0"),  # empty chunks forever, before
        ({"n": -5}, "n must be >= 0; got -5"),
        ({"n": 3, "dim": 0}, "dim must be >= 1; got 0"),
        ({"n": 3, "rank": -1}, "rank must be >= 0; got -1"),
    ],
)
def test_bad_key_arguments_are_refused_on_the_call(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_like_keys(**kwargs)  # not a generator to be advanced first


def test_queries_check_their_arguments():
    assert attention_like_queries(5, 8).shape == (5, 8)
    with pytest.raises(ValueError, match="m must be >= 0"):
        attention_like_queries(-1, 8)
    with pytest.raises(TypeError, match="dim must be an integer"):
        attention_like_queries(3, 8.0)
