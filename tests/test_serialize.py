"""Persistence: versioned, checksummed bytes; pickle; save/load; every corruption is a clear ValueError."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from conftest import answer, heavy_tailed_keys

import levstream as ls
from levstream import _serialize

DIM = 4
EPS = 0.1


@pytest.fixture(scope="module")
def small():
    """A small sketch with candidates *and* rows still waiting in the input buffer."""
    K = heavy_tailed_keys(250, DIM, seed=3)
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=64).update_many(K[:200])
    for x in K[200:]:
        sk.update(x)
    assert sk.num_retained > 0
    return sk


@pytest.fixture(scope="module")
def Q():
    return np.random.default_rng(4).standard_normal((12, DIM))


def test_round_trip_is_bit_exact_and_keeps_buffered_rows(small, Q):
    data = small.to_bytes()
    assert isinstance(data, bytes) and data[:8] == _serialize.MAGIC
    back = ls.KeySketch.from_bytes(data)
    assert back.to_bytes() == data
    assert (back.dim, back.eps, back.p, back.n, back.num_retained, back.next_id) == (
        small.dim, small.eps, small.p, small.n, small.num_retained, small.next_id)
    assert answer(back, Q) == answer(small.copy(), Q)
    for view in (bytearray(data), memoryview(data)):
        assert ls.KeySketch.from_bytes(view).to_bytes() == data


def test_round_trip_of_an_empty_sketch(Q):
    empty = ls.KeySketch(DIM, eps=EPS)
    back = ls.KeySketch.from_bytes(empty.to_bytes())
    assert back.is_empty() and answer(back, Q) == answer(empty, Q)


def test_round_trip_in_r_factor_mode(Q):
    """Rank-deficient keys put the summary in its R-factor mode; that state must survive too."""
    rng = np.random.default_rng(5)
    K = rng.standard_normal((300, 2)) @ rng.standard_normal((2, DIM))
    sk = ls.KeySketch(DIM, eps=EPS, block_rows=50).update_many(K)
    back = ls.KeySketch.from_bytes(sk.to_bytes())
    assert answer(back, Q) == answer(sk, Q)
    more = rng.standard_normal((100, DIM))
    assert answer(back.update_many(more), Q) == answer(sk.update_many(more), Q)


def test_pickle_round_trip(small, Q):
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        back = pickle.loads(pickle.dumps(small, protocol=protocol))
        assert type(back) is ls.KeySketch
        assert back.to_bytes() == small.to_bytes()
        assert answer(back, Q) == answer(small.copy(), Q)


def test_save_and_load(small, Q, tmp_path):
    path = tmp_path / "sketch.lev"
    small.save(path)
    assert path.stat().st_size == len(small.to_bytes())
    assert [p.name for p in tmp_path.iterdir()] == ["sketch.lev"]  # no temporary file left behind
    back = ls.load(path)
    assert answer(back, Q) == answer(small.copy(), Q)
    small.save(str(path))  # str paths, and overwriting, work too
    assert ls.load(os.fspath(path)).to_bytes() == small.to_bytes()


def test_load_of_a_corrupted_file_is_a_value_error(small, tmp_path):
    path = tmp_path / "bad.lev"
    data = bytearray(small.to_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ls.load(path)


def test_flipping_any_byte_is_detected(small):
    data = small.to_bytes()
    assert len(data) < 20_000
    accepted = []
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        try:
            ls.KeySketch.from_bytes(bytes(bad))
        except ValueError:
            continue
        accepted.append(i)
    assert not accepted, f"corrupted bytes accepted at offsets {accepted[:20]}"


@pytest.mark.parametrize("offset, match", [
    (0, "magic bytes"),                 # magic
    (8, "unsupported sketch format version"),  # version
    (10, "reserved header field"),      # reserved
    (12, "truncated or padded"),        # payload length
    (20, "checksum mismatch"),          # digest
    (-1, "checksum mismatch"),          # payload
])
def test_corruption_messages_name_what_was_expected(small, offset, match):
    bad = bytearray(small.to_bytes())
    bad[offset] ^= 0x01
    with pytest.raises(ValueError, match=match):
        ls.KeySketch.from_bytes(bytes(bad))


def test_truncated_and_padded_bytes(small):
    data = small.to_bytes()
    for cut in (0, 1, 8, 51, 52, 53, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated"):
            ls.KeySketch.from_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated or padded: payload of"):
        ls.KeySketch.from_bytes(data + b"\x00")


def test_wrong_magic_and_foreign_input(small):
    data = small.to_bytes()
    with pytest.raises(ValueError, match=r"not a levstream sketch: magic bytes b'PK\\x03\\x04"):
        ls.KeySketch.from_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(TypeError, match="must be bytes; got str instead"):
        ls.KeySketch.from_bytes(data.decode("latin-1"))
    with pytest.raises(ValueError):
        ls.KeySketch.from_bytes(pickle.dumps(small))


def _repack(small, meta_update=None, array_update=None, drop=()):
    meta, arrays, _ = _serialize.unpack(small.to_bytes())
    meta.update(meta_update or {})
    for name, value in (array_update or {}).items():
        arrays[name] = value(arrays[name]) if callable(value) else value
    for name in drop:
        arrays.pop(name)
    return _serialize.pack(meta, arrays)


@pytest.mark.parametrize("meta_update, array_update, drop, match", [
    ({"kind": "OtherSketch"}, None, (), "'OtherSketch', not a KeySketch"),
    ({"dim": DIM + 1}, None, (), "inconsistent shapes"),
    ({"eps": 2.0}, None, (), "1e-300 <= eps <= 1; got 2.0"),
    ({"n": 1}, None, (), "summary does not match the sketch header"),
    ({"block_rows": 0}, None, (), "block_rows must be >= 1"),
    (None, None, ("cand_ids",), "malformed: 'cand_ids'"),
    (None, {"cand_rows": np.full((3, DIM), np.nan), "cand_ids": np.arange(3)}, (), "'cand_rows' must be finite"),
    (None, {"id_ranges": np.zeros(3, np.int64)}, (), "shape \\(r, 2\\)"),
    (None, {"id_ranges": np.zeros((1, 2))}, (), "'id_ranges' must be int64; got float64"),
    (None, {"cand_ids": lambda a: a.astype(np.float64)}, (), "'cand_ids' must be int64; got float64"),
    (None, {"buf_rows": lambda a: a.astype(np.int64)}, (), "'buf_rows' must be float64; got int64"),
    (None, {"summary.hi": np.full((DIM, DIM), np.nan)}, (), "'summary.hi' must be finite"),
    (None, {"summary.lo": np.zeros((DIM, DIM), np.float32)}, (), "'summary.lo' must be float64; got float32"),
    (None, {"summary.chk_diag": np.ones(DIM + 3)}, (), "'chk_diag' must have shape"),
    ({"next_id": -1}, None, (), "next_id must be >= 0"),
])
def test_well_checksummed_but_inconsistent_payloads_are_rejected(small, meta_update, array_update, drop, match):
    """A valid checksum is not enough: the reader checks the content against the header."""
    with pytest.raises(ValueError, match=match):
        ls.KeySketch.from_bytes(_repack(small, meta_update, array_update, drop))


def test_future_format_version_is_rejected(small):
    data = bytearray(small.to_bytes())
    data[8:10] = (_serialize.FORMAT_VERSION + 1).to_bytes(2, "little")
    with pytest.raises(ValueError, match=f"unsupported sketch format version {_serialize.FORMAT_VERSION + 1}"):
        ls.KeySketch.from_bytes(bytes(data))


@pytest.mark.parametrize("how", ["bytes", "pickle"])
@pytest.mark.parametrize("options", [{}, {"value_dim": 2, "exact_output": True}, {"decay": 0.99}])
def test_a_sketch_loaded_mid_stream_goes_on_as_the_untouched_one(how, options):
    """A sketch saved and loaded every 97 rows (a service checkpointing its state) stays bit for bit the sketch that
    was never saved, prunes included: the bytes carry when the next prune is due (they once did not: a loaded
    sketch pruned at its next block, 3 000 rows later the bytes differed and it held other candidates)."""
    rng = np.random.default_rng(0)
    dv = options.get("value_dim")
    kept = ls.KeySketch(8, eps=0.02, block_rows=16, **options)
    loaded = ls.KeySketch(8, eps=0.02, block_rows=16, **options)
    for t in range(3000):
        x = rng.standard_normal(8) * rng.uniform(0.2, 3.0)
        v = None if dv is None else rng.standard_normal(dv)
        kept.update(x, v)
        loaded.update(x, v)
        if t % 97 == 50:
            data = loaded.to_bytes()
            loaded = ls.KeySketch.from_bytes(data) if how == "bytes" else pickle.loads(pickle.dumps(loaded))
        if t % 250 == 0 or t == 2999:
            assert loaded.to_bytes() == kept.to_bytes(), f"row {t}"
    assert kept._pruned_rows > 0  # prunes happened (the property under test)


@pytest.mark.parametrize("bad", ["n + 1", -1, 2.5, "12", True, None, float("inf"), float("nan")])
def test_pruned_rows_not_an_integer_in_range_is_refused(small, bad):
    """A header whose ``pruned_rows`` is not an integer in 0..n (checksum recomputed) is a clear ValueError (``int()``
    once took 2.5, '12' and True, and raised OverflowError for inf)."""
    meta, arrays, version = _serialize.unpack(small.to_bytes())
    meta["pruned_rows"] = small.n + 1 if bad == "n + 1" else bad
    with pytest.raises(ValueError, match=r"pruned_rows must be an integer in 0\.\.n"):
        ls.KeySketch.from_bytes(_serialize.pack(meta, arrays, version))


def test_r_factor_bytes_without_a_qr_step_count_keep_the_tolerance_they_were_written_with():
    """Bytes of an R-factor summary written before its QR steps were counted load with the tolerance of
    then, ``m 2u sigma_max`` (so that they answer as then); new bytes carry the count."""
    from levstream._linalg import factor_rank_tolerance, rank_tolerance
    from levstream._serialize import pack, unpack

    rng = np.random.default_rng(4)
    K = np.outer(rng.standard_normal(3000), [1.0, 2.0, -1.0])  # rank 1: the R-factor path
    sk = ls.KeySketch(3, eps=0.1, block_rows=256).update_many(K)
    sk.flush()
    meta, arrays, version = unpack(sk.to_bytes())
    assert meta["summary"]["mode"] == "qr" and meta["summary"]["qr_steps"] == sk._summary._qr_steps >= 10
    del meta["summary"]["qr_steps"]
    old = ls.KeySketch.from_bytes(pack(meta, arrays, version))
    steps = old._summary._qr_steps
    assert factor_rank_tolerance(1.0, 3000, 3, steps) == rank_tolerance(1.0, 3000, 3)
    Q = rng.standard_normal((5, 3))
    assert old.heavy_entries(Q).as_set() == sk.heavy_entries(Q).as_set()
    meta["summary"]["qr_steps"] = -1
    with pytest.raises(ValueError, match="qr_steps"):
        ls.KeySketch.from_bytes(pack(meta, arrays, version))
