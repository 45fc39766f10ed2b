"""End-to-end tests of the ``levstream`` command line, in ``tmp_path``.

Answers are checked against brute force (``tests/naive.py``) and against the library call the command
wraps; every user error must give its documented exit code and exactly one line on stderr, no traceback.
Most commands run in-process through ``levstream.cli.main`` (fast); a few run the installed entry point
in a subprocess (stdin, the real exit status, the demo).
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import VALUE_RTOL, assert_matches_offline, heavy_tailed_keys
from naive import dense_heavy, leverage_svd

import levstream as ls
from levstream import cli
from levstream.cli import (
    EXIT_CODES,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_SKETCH,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    main,
)

DIM, EPS, N = 12, 0.05, 6_000


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return heavy_tailed_keys(N, DIM, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.standard_normal((40, DIM))


@pytest.fixture()
def files(tmp_path, keys, queries):
    np.save(tmp_path / "K.npy", keys)
    np.savez(tmp_path / "K.npz", keys=keys, other=keys[:5])
    np.savez_compressed(tmp_path / "Kc.npz", keys=keys)
    np.savez(tmp_path / "Kf.npz", keys=np.asfortranarray(keys))
    np.save(tmp_path / "Kf.npy", np.asfortranarray(keys))
    np.save(tmp_path / "Q.npy", queries)
    return tmp_path


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, expected: int, *words: str) -> None:
    assert code == expected, f"exit code {code}, expected {expected}; stderr: {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("levstream: error: ")
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def build(files, source, *extra, out="S.lvs", capsys):
    code, stdout, err = run(["build", source, "-o", files / out, "--eps", EPS, "--quiet", *extra], capsys)
    assert code == EXIT_OK, err
    return ls.load(files / out), stdout


# ---------------------------------------------------------------------- build
@pytest.mark.parametrize("source", ["K.npy", "K.npz:keys", "Kc.npz:keys", "Kf.npz:keys", "Kf.npy"])
def test_build_from_files_gives_offline_universal_set(files, keys, source, capsys):
    sketch, stdout = build(files, files / source, "--chunk", 1000, capsys=capsys)
    assert sketch.n == N and sketch.dim == DIM and sketch.eps == EPS
    assert_matches_offline(sketch.universal_set().ids, leverage_svd(keys), EPS)
    assert f"n={N:,}" in stdout


def test_build_from_stdin_float32_and_float64(files, keys, tmp_path):
    tau = leverage_svd(keys.astype(np.float32).astype(np.float64))
    for dtype in ("float32", "float64"):
        out = tmp_path / f"{dtype}.lvs"
        proc = subprocess.run(
            [sys.executable, "-m", "levstream.cli", "build", "-", "-o", out, "--eps", str(EPS),
             "--dim", str(DIM), "--dtype", dtype, "--chunk", "999", "--quiet"],
            input=keys.astype(dtype).tobytes(), capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        sketch = ls.load(out)
        assert sketch.n == N
        ref = tau if dtype == "float32" else leverage_svd(keys)
        assert_matches_offline(sketch.universal_set().ids, ref, EPS)


def test_build_from_integer_keys(files, capsys):
    K = np.random.default_rng(3).integers(-50, 50, size=(3000, 6)).astype(np.int32)
    np.save(files / "Kint.npy", K)
    sketch, _ = build(files, files / "Kint.npy", capsys=capsys)
    assert_matches_offline(sketch.universal_set().ids, leverage_svd(K.astype(np.float64)), EPS)


def test_build_chunk_size_does_not_change_the_answer(files, capsys):
    a, _ = build(files, files / "K.npy", "--chunk", 1, out="a.lvs", capsys=capsys)
    b, _ = build(files, files / "K.npy", "--chunk", 4096, out="b.lvs", capsys=capsys)
    np.testing.assert_array_equal(a.universal_set().ids, b.universal_set().ids)


def test_append_equals_one_build(files, keys, capsys):
    np.save(files / "K1.npy", keys[:2500])
    np.save(files / "K2.npy", keys[2500:])
    build(files, files / "K1.npy", out="app.lvs", capsys=capsys)
    code, _, err = run(["build", files / "K2.npy", "-o", files / "app.lvs", "--append", "--quiet"], capsys)
    assert code == EXIT_OK, err
    appended = ls.load(files / "app.lvs")
    assert appended.n == N
    assert_matches_offline(appended.universal_set().ids, leverage_svd(keys), EPS)


def test_offset_shards_merge_equals_single_build(files, keys, queries, capsys):
    cut = 3_700
    np.save(files / "K1.npy", keys[:cut])
    np.save(files / "K2.npy", keys[cut:])
    build(files, files / "K2.npy", "--offset", cut, out="s2.lvs", capsys=capsys)
    build(files, files / "K1.npy", out="s1.lvs", capsys=capsys)
    code, _, err = run(["merge", files / "s2.lvs", files / "s1.lvs", "-o", files / "m.lvs"], capsys)
    assert code == EXIT_OK, err
    single, _ = build(files, files / "K.npy", out="single.lvs", capsys=capsys)
    merged = ls.load(files / "m.lvs")
    assert merged.n == N
    np.testing.assert_array_equal(merged.universal_set().ids, single.universal_set().ids)
    assert merged.heavy_entries(queries).as_set() == set(dense_heavy(queries, keys, EPS))


def test_jobs_build_equals_single_stream(files, keys, capsys):
    for source in ("K.npy", "K.npz:keys"):
        sketch, _ = build(files, files / source, "--jobs", 2, "--chunk", 1000, out=f"jobs{source[-4:]}.lvs",
                          capsys=capsys)
        assert sketch.n == N
        assert_matches_offline(sketch.universal_set().ids, leverage_svd(keys), EPS)


@pytest.mark.parametrize("extra", [[], ["--jobs", "2"]])
def test_keys_without_rows_build_an_empty_sketch(files, extra, capsys):
    """An empty key file of the right width is a no-op: a new sketch holds n = 0 keys (issue 11)."""
    np.save(files / "E.npy", np.zeros((0, DIM)))
    np.savez(files / "E.npz", keys=np.zeros((0, DIM), dtype=np.float32))
    for i, source in enumerate(("E.npy", "E.npz:keys")):
        sketch, stdout = build(files, files / source, *extra, out=f"e{i}.lvs", capsys=capsys)
        assert sketch.n == 0 and sketch.dim == DIM and sketch.is_empty()
        assert "n=0 keys" in stdout and "|U|=0" in stdout


@pytest.mark.parametrize("extra", [[], ["--jobs", "2"]])
def test_appending_keys_without_rows_changes_nothing(files, keys, queries, extra, capsys):
    build(files, files / "K.npy", capsys=capsys)
    before = ls.load(files / "S.lvs")
    np.save(files / "E.npy", np.zeros((0, DIM)))
    code, _, err = run(["build", files / "E.npy", "-o", files / "S.lvs", "--append", "--quiet", *extra],
                       capsys)
    assert code == EXIT_OK, err
    after = ls.load(files / "S.lvs")
    assert (after.n, after.next_id) == (before.n, before.next_id) == (N, N)
    np.testing.assert_array_equal(after.universal_set().ids, before.universal_set().ids)
    assert after.heavy_entries(queries).as_set() == set(dense_heavy(queries, keys, EPS))
    # a wrong width is still an error, rows or not, and leaves the file alone
    np.save(files / "Enarrow.npy", np.zeros((0, DIM - 1)))
    saved = (files / "S.lvs").read_bytes()
    code, _, err = run(["build", files / "Enarrow.npy", "-o", files / "S.lvs", "--append", *extra], capsys)
    assert_user_error(code, err, EXIT_INPUT, f"width {DIM - 1}", f"dim {DIM}")
    assert (files / "S.lvs").read_bytes() == saved


def test_empty_stdin_builds_an_empty_sketch(tmp_path):
    out = tmp_path / "e.lvs"
    for extra in ([], ["--jobs", "2"]):
        proc = subprocess.run([sys.executable, "-m", "levstream.cli", "build", "-", "-o", out, "--eps", "0.1",
                               "--dim", "4", "--dtype", "float32", "--quiet", "--force", *extra],
                              input=b"", capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        sketch = ls.load(out)
        assert sketch.n == 0 and sketch.dim == 4


# ---------------------------------------------------------------------- query and info
def test_query_npz_output_equals_library_and_brute_force(files, keys, queries, capsys):
    sketch, _ = build(files, files / "K.npy", capsys=capsys)
    code, stdout, err = run(["query", files / "S.lvs", files / "Q.npy", "-o", files / "hits.npz"], capsys)
    assert code == EXIT_OK, err
    with np.load(files / "hits.npz") as hits:
        expect = sketch.heavy_entries(queries)
        for name in ("indptr", "key_ids", "values"):
            np.testing.assert_array_equal(hits[name], getattr(expect, name))
        rows = np.repeat(np.arange(queries.shape[0]), np.diff(hits["indptr"]))
        got = dict(zip(zip(rows.tolist(), hits["key_ids"].tolist()), hits["values"].tolist()))
    truth = dense_heavy(queries, keys, EPS)
    assert got.keys() == truth.keys() and len(truth) > 0
    for entry, value in truth.items():
        assert got[entry] == pytest.approx(value, rel=VALUE_RTOL)
    assert f"{len(truth):,} entries" in stdout


def test_query_reads_queries_from_an_npz_member(files, queries, capsys):
    sketch, _ = build(files, files / "K.npy", capsys=capsys)
    np.savez(files / "Q.npz", first=queries[:3], queries=queries)
    code, _, err = run(["query", files / "S.lvs", f"{files / 'Q.npz'}:queries", "-o", files / "h.npz"], capsys)
    assert code == EXIT_OK, err
    with np.load(files / "h.npz") as hits:
        np.testing.assert_array_equal(hits["key_ids"], sketch.heavy_entries(queries).key_ids)
        np.testing.assert_array_equal(hits["indptr"], sketch.heavy_entries(queries).indptr)


def test_query_table_on_stdout_lists_every_entry(files, keys, queries, capsys):
    build(files, files / "K.npy", capsys=capsys)
    eps = 0.1
    code, stdout, err = run(["query", files / "S.lvs", files / "Q.npy", "--eps", eps], capsys)
    assert code == EXIT_OK, err
    lines = [ln for ln in stdout.splitlines() if ln and not ln.startswith("#")]
    assert lines[0].split() == ["query", "key_id", "attention"]
    table = {(int(i), int(k)): float(v) for i, k, v in (ln.split() for ln in lines[1:])}
    truth = dense_heavy(queries, keys, eps)
    assert table.keys() == truth.keys()
    for entry, value in truth.items():
        assert table[entry] == pytest.approx(value, rel=1e-5)  # printed with 6 significant digits


def test_query_top_k_keeps_the_largest_entries(files, keys, queries, capsys):
    build(files, files / "K.npy", capsys=capsys)
    k = 2
    code, _, err = run(["query", files / "S.lvs", files / "Q.npy", "--top-k", k, "-o", files / "top.npz"],
                       capsys)
    assert code == EXIT_OK, err
    truth = dense_heavy(queries, keys, EPS)
    with np.load(files / "top.npz") as hits:
        indptr, key_ids, values = hits["indptr"], hits["key_ids"], hits["values"]
    for i in range(queries.shape[0]):
        row = sorted(((v, key) for (q, key), v in truth.items() if q == i), key=lambda t: (-t[0], t[1]))[:k]
        assert key_ids[indptr[i]:indptr[i + 1]].tolist() == [key for _, key in row]
        np.testing.assert_allclose(values[indptr[i]:indptr[i + 1]], [v for v, _ in row], rtol=VALUE_RTOL)


def test_query_general_p_reports_bounds_that_hold(files, keys, queries, capsys):
    p = 3.0
    code, _, err = run(["build", files / "K.npy", "-o", files / "p3.lvs", "--eps", EPS, "--p", p, "--quiet"],
                       capsys)
    assert code == EXIT_OK, err
    code, stdout, err = run(["query", files / "p3.lvs", files / "Q.npy", "-o", files / "p3.npz"], capsys)
    assert code == EXIT_OK, err
    B = np.abs(queries @ keys.T) ** p
    A = B / B.sum(axis=1, keepdims=True)
    with np.load(files / "p3.npz") as hits:
        rows = np.repeat(np.arange(queries.shape[0]), np.diff(hits["indptr"]))
        true = A[rows, hits["key_ids"]]
        assert np.all(hits["lower"] <= true * (1 + 1e-12)) and np.all(true <= hits["upper"] * (1 + 1e-12))
        got = set(zip(rows.tolist(), hits["key_ids"].tolist()))
    assert {(int(i), int(j)) for i, j in zip(*np.nonzero(A >= EPS))} <= got  # no heavy entry missed
    code, stdout, err = run(["query", files / "p3.lvs", files / "Q.npy"], capsys)
    assert "lower" in stdout.splitlines()[2] and "upper" in stdout.splitlines()[2]


def test_info_reports_the_sketch(files, keys, capsys):
    sketch, _ = build(files, files / "K.npy", capsys=capsys)
    code, stdout, err = run(["info", files / "S.lvs"], capsys)
    assert code == EXIT_OK, err
    fields = {}
    for line in stdout.splitlines()[1:]:
        label, _, value = line.strip().partition("  ")
        fields[label.strip()] = value.strip()
    n_universal = len(set(np.flatnonzero(leverage_svd(keys) >= EPS).tolist()))
    assert fields["format version"] == "1"
    assert fields["dim"] == str(DIM)
    assert fields["p"] == "2"
    assert fields["eps"] == str(EPS)
    assert fields["n (keys seen)"] == f"{N:,}"
    assert fields["|U| (universal set)"] == f"{n_universal:,}"
    assert fields["file bytes"] == f"{(files / 'S.lvs').stat().st_size:,}"
    assert fields["bound on |U|"] == f"{DIM / EPS:,.0f}"


def test_help_documents_every_exit_code(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for code in EXIT_CODES:
        assert f"  {code} " in out
    for command in ("demo", "build", "merge", "query", "info", "bench"):
        assert command in out


# ---------------------------------------------------------------------- user errors
def test_missing_and_malformed_key_files(files, capsys):
    (files / "junk.npy").write_bytes(b"not an array")
    np.save(files / "vec.npy", np.ones(7))
    np.save(files / "cplx.npy", np.ones((3, DIM), dtype=complex))
    bad = np.ones((10, DIM))
    bad[7, 3] = np.nan
    np.save(files / "nan.npy", bad)
    data = bytearray((files / "Kc.npz").read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (files / "broken.npz").write_bytes(bytes(data))
    cases = [
        ("broken.npz:keys", "corrupted"),
        ("missing.npy", "no such file"),
        ("junk.npy", "not a readable .npy"),
        ("vec.npy", "2-D"),
        ("cplx.npy", "real numbers"),
        ("nan.npy", "row 7, column 3"),
        ("K.npz", "name one as"),
        ("K.npz:nope", "no array named 'nope'"),
    ]
    for name, words in cases:
        code, _, err = run(["build", files / name, "-o", files / "x.lvs", "--eps", EPS, "--quiet"], capsys)
        assert_user_error(code, err, EXIT_INPUT, words)
        assert not (files / "x.lvs").exists()


@pytest.mark.parametrize("argv, words", [
    (["--eps", "0"], "1e-300 <= --eps <= 1"),
    (["--eps", "1.5"], "1e-300 <= --eps <= 1"),
    (["--eps", "nan"], "finite"),
    ([], "--eps is required"),
    (["--eps", "0.1", "--p", "-1"], "p must satisfy 0.01 <= p <= 32"),
    (["--eps", "0.1", "--chunk", "0"], "--chunk"),
    (["--eps", "0.1", "--offset", "-3"], "--offset"),
    (["--eps", "0.1", "--jobs", "0"], "--jobs"),
])
def test_bad_build_parameters(files, argv, words, capsys):
    code, _, err = run(["build", files / "K.npy", "-o", files / "x.lvs", "--quiet", *argv], capsys)
    assert_user_error(code, err, EXIT_USAGE, words)


def test_build_refuses_to_overwrite_and_checks_append(files, capsys):
    build(files, files / "K.npy", capsys=capsys)
    before = (files / "S.lvs").read_bytes()
    code, _, err = run(["build", files / "K.npy", "-o", files / "S.lvs", "--eps", EPS, "--quiet"], capsys)
    assert_user_error(code, err, EXIT_USAGE, "exists", "--append", "--force")
    # appending the same keys again: ids clash, the file is left as it was
    code, _, err = run(["build", files / "K.npy", "-o", files / "S.lvs", "--append", "--offset", 10, "--quiet"],
                       capsys)
    assert_user_error(code, err, EXIT_SKETCH, "clash")
    code, _, err = run(["build", files / "K.npy", "-o", files / "S.lvs", "--append", "--eps", 0.2], capsys)
    assert_user_error(code, err, EXIT_USAGE, "--eps 0.2 differs")
    np.save(files / "narrow.npy", np.ones((5, DIM - 1)))
    code, _, err = run(["build", files / "narrow.npy", "-o", files / "S.lvs", "--append"], capsys)
    assert_user_error(code, err, EXIT_INPUT, f"width {DIM - 1}", f"dim {DIM}")
    code, _, err = run(["build", files / "K.npy", "-o", files / "none.lvs", "--append"], capsys)
    assert_user_error(code, err, EXIT_SKETCH, "does not exist")
    assert (files / "S.lvs").read_bytes() == before


def test_stdin_errors(tmp_path):
    def build_stdin(data: bytes, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "levstream.cli", "build", "-", "-o", tmp_path / "x.lvs",
                               "--eps", "0.1", "--quiet", *flags], input=data, capture_output=True, timeout=120)

    rows = np.ones((10, 4), dtype=np.float32).tobytes()
    for proc, expected, words in [
        (build_stdin(rows), EXIT_USAGE, "--dim"),
        (build_stdin(rows[:-2], "--dim", "4", "--dtype", "float32"), EXIT_INPUT, "mid-row"),
    ]:
        assert_user_error(proc.returncode, proc.stderr.decode(), expected, words)
    assert not (tmp_path / "x.lvs").exists()


def test_sketch_file_errors(files, capsys):
    build(files, files / "K.npy", capsys=capsys)
    data = bytearray((files / "S.lvs").read_bytes())
    data[-10] ^= 0xFF
    (files / "flipped.lvs").write_bytes(bytes(data))
    (files / "short.lvs").write_bytes(bytes(data[:100]))
    (files / "foreign.lvs").write_bytes(b"PK\x03\x04 something else entirely, long enough for a header.....")
    for name, words in [("missing.lvs", "no such sketch file"), ("flipped.lvs", "checksum"),
                        ("short.lvs", "truncated"), ("foreign.lvs", "not a levstream sketch")]:
        for argv in (["info", files / name], ["query", files / name, files / "Q.npy"],
                     ["merge", files / "S.lvs", files / name, "-o", files / "out.lvs"]):
            code, _, err = run(argv, capsys)
            assert_user_error(code, err, EXIT_SKETCH, name, words)
    assert not (files / "out.lvs").exists()


def test_merge_errors(files, keys, capsys):
    build(files, files / "K.npy", out="a.lvs", capsys=capsys)
    build(files, files / "K.npy", out="b.lvs", capsys=capsys)
    code, _, err = run(["merge", files / "a.lvs", files / "b.lvs", "-o", files / "ab.lvs"], capsys)
    assert_user_error(code, err, EXIT_SKETCH, "b.lvs", "key id")
    code, _, err = run(["build", files / "K.npy", "-o", files / "c.lvs", "--eps", 0.2, "--offset", N, "--quiet"],
                       capsys)
    assert code == EXIT_OK
    code, _, err = run(["merge", files / "a.lvs", files / "c.lvs", "-o", files / "ac.lvs"], capsys)
    assert_user_error(code, err, EXIT_SKETCH, "c.lvs", "different (dim, eps, p")
    code, _, err = run(["merge", files / "a.lvs", "-o", files / "a2.lvs"], capsys)
    assert_user_error(code, err, EXIT_USAGE, "at least two")
    code, _, err = run(["merge", files / "a.lvs", files / "c.lvs", "-o", files / "b.lvs"], capsys)
    assert_user_error(code, err, EXIT_USAGE, "exists")
    assert not (files / "ab.lvs").exists() and not (files / "ac.lvs").exists()


def test_query_errors(files, capsys):
    build(files, files / "K.npy", capsys=capsys)
    np.save(files / "Qwide.npy", np.ones((3, DIM + 1)))
    sketch_file, q = files / "S.lvs", files / "Q.npy"
    for argv, expected, words in [
        ([sketch_file, files / "Qwide.npy"], EXIT_INPUT, f"width {DIM + 1}"),
        ([sketch_file, files / "nothere.npy"], EXIT_INPUT, "no such file"),
        ([sketch_file, q, "--eps", 0.01], EXIT_USAGE, "--eps must be >="),
        ([sketch_file, q, "--eps", 2], EXIT_USAGE, "1e-300 <= --eps <= 1"),
        ([sketch_file, q, "--top-k", 0], EXIT_USAGE, "--top-k"),
        ([sketch_file, q, "-o", files / "no" / "dir" / "hits.npz"], EXIT_INPUT, "cannot write"),
    ]:
        code, _, err = run(["query", *argv], capsys)
        assert_user_error(code, err, expected, words)


def test_argparse_errors_exit_with_usage_code(capsys):
    for argv in (["build"], ["frobnicate"], ["query", "only-one-arg"], ["build", "K.npy", "-o", "x", "--eps", "abc"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == EXIT_USAGE
        assert "Traceback" not in capsys.readouterr().err


def test_scheduler_unreachable_is_one_line(files, capsys):
    dask = pytest.importorskip("dask", reason="dask is needed for --scheduler")
    pytest.importorskip("distributed", reason="distributed is needed for --scheduler")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code, _, err = run(["build", files / "K.npy", "-o", files / "x.lvs", "--eps", EPS, "--quiet",
                            "--scheduler", "tcp://127.0.0.1:9"], capsys)
    assert_user_error(code, err, EXIT_UNAVAILABLE, "tcp://127.0.0.1:9")


def test_scheduler_build_equals_single_stream(files, keys, capsys):
    pytest.importorskip("dask", reason="dask is needed for --scheduler")
    distributed = pytest.importorskip("distributed", reason="distributed is needed for --scheduler")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                  dashboard_address=None) as cluster:
        sketch, _ = build(files, files / "K.npy", "--scheduler", cluster.scheduler_address, "--chunk", 1500,
                          "--offset", 7, capsys=capsys)
        np.save(files / "E.npy", np.zeros((0, DIM)))  # no rows: one empty partition, an empty sketch
        empty, _ = build(files, files / "E.npy", "--scheduler", cluster.scheduler_address, out="E.lvs",
                         capsys=capsys)
    assert empty.n == 0 and empty.dim == DIM
    assert sketch.n == N
    tau = leverage_svd(keys)
    assert_matches_offline(sketch.universal_set().ids - 7, tau, EPS)


# ---------------------------------------------------------------------- demo and bench (installed entry point)
def test_demo_small_run_checks_and_prints_the_table(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the demo's --plot figure")
    png = tmp_path / "demo.png"
    proc = subprocess.run(["levstream", "demo", "--n", "50000", "--queries", "200", "--check", "50", "--quiet",
                           "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("keys streamed n ", "universal set |U|", "bound d/eps = 6,400", "sketch vs raw keys",
                  "build vs Gram-only", "query vs dense", "recall / precision"):
        assert label in proc.stdout
    assert "1.000 / 1.000" in proc.stdout
    assert re.search(r"U vs offline \{tau >= eps\}\s+identical", proc.stdout)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_general_p_checks_the_coreset_guarantee(capsys):
    code, stdout, err = run(["demo", "--n", 20000, "--dim", 8, "--eps", 0.05, "--p", 3, "--queries", 100,
                             "--check", 30, "--quiet"], capsys)
    assert code == EXIT_OK, stdout + err
    assert "recall / precision [3]     1.000 /" in stdout
    assert "every returned entry within the guarantee" in stdout


def test_demo_fails_with_exit_code_3_when_an_entry_is_missing(monkeypatch, capsys):
    real = ls.KeySketch.heavy_entries

    def drop_first_entry(self, Q, eps=None):
        hits = real(self, Q, eps)
        counts = np.diff(hits.indptr)
        first = int(np.flatnonzero(counts)[0])
        counts[first] -= 1
        keep = np.ones(len(hits), dtype=bool)
        keep[hits.indptr[first]] = False
        return ls.HeavyEntries.from_counts(counts, hits.key_ids[keep], hits.values[keep], hits.eps)

    monkeypatch.setattr(ls.KeySketch, "heavy_entries", drop_first_entry)
    code, stdout, _ = run(["demo", "--n", 20000, "--dim", 16, "--queries", 100, "--check", 100, "--quiet"],
                          capsys)
    assert code == cli.EXIT_FAILED_CHECK
    assert "FAILED: the sketch disagrees with brute force (1 heavy entries missed" in stdout


def test_demo_bad_flags(capsys):
    code, _, err = run(["demo", "--n", "0"], capsys)
    assert_user_error(code, err, EXIT_USAGE, "--n")
    code, _, err = run(["demo", "--eps", "3"], capsys)
    assert_user_error(code, err, EXIT_USAGE, "eps")


def test_bench_quick_table(capsys):
    code, stdout, err = run(["bench", "--sizes", "20000", "--dim", 16, "--queries", 50, "--repeat", 1], capsys)
    assert code == EXIT_OK, err
    row = [ln for ln in stdout.splitlines() if ln.strip().startswith("20,000")]
    assert len(row) == 1
    assert row[0].split()[-2:] == ["1.000", "1.000"]  # recall, precision against dense NumPy


def test_bench_fails_with_exit_code_3_when_an_entry_is_spurious(monkeypatch, capsys):
    real = ls.KeySketch.heavy_entries

    def add_an_entry(self, Q, eps=None):
        hits = real(self, Q, eps)
        counts = np.diff(hits.indptr)
        counts[0] += 1  # a key id no dense answer has
        return ls.HeavyEntries.from_counts(counts, np.concatenate([[10**12], hits.key_ids]),
                                           np.concatenate([[0.5], hits.values]), hits.eps)

    monkeypatch.setattr(ls.KeySketch, "heavy_entries", add_an_entry)
    code, stdout, _ = run(["bench", "--sizes", 5000, "--dim", 8, "--queries", 20, "--repeat", 1], capsys)
    assert code == cli.EXIT_FAILED_CHECK
    assert [ln for ln in stdout.splitlines() if ln.strip().startswith("5,000")][0].split()[-1] != "1.000"


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_the_demo_and_bench_oracle_streams_chunks_to_the_dense_answer(keys, queries, p):
    """levstream.testing.DenseHeavyScan (the dense side of demo, bench and the benchmarks), fed uneven
    chunks (one empty) and small score blocks, against dense attention over all keys at once."""
    B = np.abs(queries @ keys.T) ** p
    A = B / B.sum(axis=1, keepdims=True)
    eps = 0.01
    scan = ls.testing.DenseHeavyScan(queries, eps=eps, p=p, offset=100, block_rows=700)
    for chunk in np.split(keys, [10, 10, 2500, 4000]):
        assert scan.add(chunk) is scan
    hits = scan.result()
    assert scan.n == N
    np.testing.assert_allclose(scan.normalizer, B.sum(axis=1), rtol=VALUE_RTOL)
    rows, cols = np.nonzero(A >= eps)
    assert len({(i, j) for i, j in zip(rows, cols) if abs(A[i, j] - eps) <= 1e-9 * eps}) == 0  # no ties
    assert hits.as_set() == {(int(i), int(j) + 100) for i, j in zip(rows, cols)}
    np.testing.assert_allclose(hits.values, A[hits.rows(), hits.key_ids - 100], rtol=VALUE_RTOL)
    assert len(ls.testing.DenseHeavyScan(queries, eps=eps).result()) == 0  # no keys, no entries


def test_top_entries_orders_by_value_then_id():
    hits = ls.HeavyEntries.from_counts(np.array([3, 0, 2]), np.array([1, 5, 9, 2, 4]),
                                       np.array([0.2, 0.5, 0.2, 0.3, 0.3]), 0.1)
    indptr, index = cli.top_entries(hits, 2)
    assert indptr.tolist() == [0, 2, 2, 4]
    assert hits.key_ids[index].tolist() == [5, 1, 2, 4]
    assert hits.values[index].tolist() == [0.5, 0.2, 0.3, 0.3]


# ---------------------------------------------------------------------- review fixes
@pytest.mark.parametrize(
    "options",
    [{"p": 4, "exact": True}, {"p": 3, "delta": 0.2, "rng": 5}, {"decay": 0.999}],
    ids=["exact p=4", "coreset delta", "decay"],
)
def test_parallel_append_builds_the_new_part_like_the_sketch_it_joins(files, keys, queries, options, capsys):
    """``build --append --jobs`` builds the new keys with the options of the sketch they join (it once built
    them with defaults, and the merge was refused: exit 5, the file unchanged); the answers equal the serial
    append's (for the coreset: its guarantee against brute force, as the two coresets sample differently)."""
    half = N // 2
    np.save(files / "K2.npy", keys[half:])
    got = {}
    for jobs in ([], ["--jobs", "2"]):
        path = files / f"app{len(jobs)}.lvs"
        ls.KeySketch(DIM, eps=EPS, **options).update_many(keys[:half]).save(path)
        code, _, err = run(["build", files / "K2.npy", "-o", path, "--append", "--quiet", *jobs], capsys)
        assert code == EXIT_OK, err
        got[len(jobs)] = ls.load(path)
        assert got[len(jobs)].n == N
    serial, parallel = got[0], got[2]
    assert parallel._part_options() == {**serial._part_options()}
    if options.get("p", 2) == 3:  # every dense entry >= eps is reported (the coreset's normaliser within delta)
        W = np.abs(queries @ keys.T) ** 3
        rows, cols = np.nonzero(W / W.sum(axis=1, keepdims=True) >= EPS)
        hits = parallel.heavy_entries(queries)
        assert set(zip(rows.tolist(), cols.tolist())) <= set(zip(hits.rows().tolist(), hits.key_ids.tolist()))
    else:
        assert parallel.heavy_entries(queries).as_set() == serial.heavy_entries(queries).as_set()


def test_a_failed_save_leaves_no_file_behind(files, capsys):
    """``save`` writes through a temporary file; when the write or the rename fails, the temporary file goes too
    (it once stayed, a full copy of the sketch, at every failed attempt)."""
    (files / "taken").mkdir()
    sk = ls.KeySketch(DIM, eps=EPS).update_many(np.ones((3, DIM)))
    before = sorted(p.name for p in files.iterdir())
    with pytest.raises(OSError):
        sk.save(files / "taken")
    code, _, err = run(["build", files / "K.npy", "-o", files / "taken", "--eps", EPS, "--force", "--quiet"], capsys)
    assert code == EXIT_INPUT, err
    assert sorted(p.name for p in files.iterdir()) == before


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--eps", "0.05", "--p", "1e6"], ["p must satisfy", "32"]),
        (["--eps", "0.05", "--p", "1e-300"], ["p must satisfy", "0.01"]),
        (["--eps", "1e-320"], ["eps must satisfy", "1e-300"]),
    ],
)
def test_extreme_p_and_eps_are_refused_in_one_line(files, argv, words, capsys):
    """Out-of-range exponents and thresholds get the usual one-line error (they once crashed with OverflowError or
    ZeroDivisionError and a traceback)."""
    code, _, err = run(["build", files / "K.npy", "-o", files / "X.lvs", "--quiet", *argv], capsys)
    assert_user_error(code, err, EXIT_USAGE, *words)
    assert not (files / "X.lvs").exists()


def test_a_coreset_whose_lewis_weights_do_not_converge_is_a_one_line_error(files, capsys, monkeypatch):
    """A coreset of a large p whose Lewis-weight iteration does not converge on the keys: one line, exit 2."""
    import levstream.lewis as lewis

    def fail(*args, **kwargs):
        raise lewis.LewisConvergenceError("lewis_weights did not converge for p = 30: residual 1 > tol 1e-12.")

    monkeypatch.setattr(lewis, "_iterate", fail)
    code, _, err = run(["build", files / "K.npy", "-o", files / "X.lvs", "--eps", EPS, "--quiet", "--p", 30], capsys)
    assert_user_error(code, err, EXIT_USAGE, "did not converge", "smaller --p")
