"""Unit tests for trainserve.datasets.tables: CSV/NPZ parsing, schemas, sniffing and the stored-table round trip."""

from __future__ import annotations

import gc
import mmap
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trainserve.datasets.tables import (
    MAX_CLASSES,
    CsvOptions,
    Table,
    parse_csv,
    parse_npz,
    read_table,
    sniff_format,
    write_table,
)
from trainserve.errors import InvalidInput

NPZ_LIMIT = 1_000_000


def write_file(tmp_path: Path, content: bytes | str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def csv_error(tmp_path: Path, content: bytes | str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_csv(write_file(tmp_path, content))
    return info.value


def write_npz(tmp_path: Path, name: str = "data.npz", **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def npz_error(path: Path, max_elements: int = NPZ_LIMIT) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_npz(path, max_elements=max_elements)
    return info.value


# -- CSV: good input ------------------------------------------------------------------------


def test_csv_with_int_float_and_string_columns(tmp_path):
    table = parse_csv(write_file(tmp_path, "count,weight,label\n3,2.5,cat\n1,4.0,dog\n3,0.5,cat\n"))

    assert table.names == ["count", "weight", "label"]
    assert table.n_rows == 3
    assert table.column("count").dtype == np.int64
    assert table.column("weight").dtype == np.float64
    assert table.column("label").dtype.kind == "U"
    assert table.column("count").tolist() == [3, 1, 3]
    assert table.column("weight").tolist() == [2.5, 4.0, 0.5]
    assert table.column("label").tolist() == ["cat", "dog", "cat"]

    schema = table.schema()
    assert schema.n_rows == 3
    assert [{k: c.as_dict()[k] for k in ("name", "dtype", "classes")} for c in schema.columns] == [
        {"name": "count", "dtype": "int64", "classes": [1, 3]},
        {"name": "weight", "dtype": "float64", "classes": None},  # 2.5 is not a class label
        {"name": "label", "dtype": "string", "classes": ["cat", "dog"]},
    ]


def test_csv_float_column_of_whole_numbers_offers_integer_classes(tmp_path):
    schema = parse_csv(write_file(tmp_path, "x,y\n0.5,1.0\n1.5,0.0\n2.5,1.0\n")).schema()
    y = schema.column("y")
    assert y is not None
    assert y.dtype == "float64"
    assert y.classes == [0, 1]


def test_csv_column_with_too_many_distinct_values_offers_no_classes(tmp_path):
    n = MAX_CLASSES + 1
    text = "x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(n))
    schema = parse_csv(write_file(tmp_path, text)).schema()
    assert schema.column("x").classes is None
    assert schema.column("y").classes == [0, 1]


def test_csv_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    table = parse_csv(write_file(tmp_path, "\ufeffa,b\n1,2\n"))
    assert table.names == ["a", "b"]
    assert table.column("a").tolist() == [1]


def test_csv_blank_lines_are_skipped(tmp_path):
    table = parse_csv(write_file(tmp_path, "\n\na,b\n\n1,2\n\n\n3,4\n\n"))
    assert table.names == ["a", "b"]
    assert table.n_rows == 2
    assert table.column("b").tolist() == [2, 4]


def test_csv_row_numbers_in_warnings_do_not_count_blank_lines(tmp_path):
    table = parse_csv(write_file(tmp_path, "a,b\n\n1,2\n\n\n3,oops\n"))
    (warning,) = table.schema().column("b").profile["warnings"]
    assert "row 2: 'oops'" in warning


def test_csv_crlf_quotes_and_padding(tmp_path):
    table = parse_csv(write_file(tmp_path, ' a , b ,c\r\n 1 , 2.5 ,"x, y"\r\n2,3,z\r\n'))
    assert table.names == ["a", "b", "c"]
    assert table.column("a").tolist() == [1, 2]
    assert table.column("b").tolist() == [2.5, 3.0]
    assert table.column("c").tolist() == ["x, y", "z"]


def test_csv_spanning_several_chunks_joins_int_and_float_parts(tmp_path):
    n = 70_000  # more than one 65,536-row chunk
    rows = [f"{i},{i % 3}" for i in range(n - 1)] + [f"{n - 1},0.5"]
    table = parse_csv(write_file(tmp_path, "a,b\n" + "\n".join(rows) + "\n"))
    assert table.n_rows == n
    assert table.column("a").dtype == np.int64
    assert table.column("a")[-1] == n - 1
    assert table.column("b").dtype == np.float64
    assert table.column("b")[:3].tolist() == [0.0, 1.0, 2.0]
    assert table.column("b")[-1] == 0.5


# -- CSV: bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n\n\n", "\r\n"], ids=["zero-bytes", "blank-lines", "crlf"])
def test_csv_empty_file(tmp_path, content):
    error = csv_error(tmp_path, content)
    assert "empty" in error.detail
    assert error.status_code == 422


def test_csv_header_only(tmp_path):
    error = csv_error(tmp_path, "a,b\n")
    assert "no data rows" in error.detail


@pytest.mark.parametrize("bad_row", ["3", "3,4,5"])
def test_csv_ragged_row_is_named(tmp_path, bad_row):
    error = csv_error(tmp_path, f"a,b\n1,2\n{bad_row}\n")
    assert "row 2" in error.detail
    assert error.errors[0]["row"] == 2


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity"])
def test_csv_non_finite_number_is_named(tmp_path, value):
    error = csv_error(tmp_path, f"a,b\n1,2\n3,{value}\n")
    assert "row 2" in error.detail
    assert "'b'" in error.detail
    assert "finite" in error.detail
    assert error.errors[0]["row"] == 2
    assert error.errors[0]["column"] == "b"


@pytest.mark.parametrize(
    ("content", "row"),
    [
        ("a,b\n1,2\n3,\n", 2),  # numeric column
        ("a,b\n1,2\n3,   \n", 2),  # only spaces
        ("a,b\n1,\n3,4\n", 1),  # the very first value
        ("a,b\n1,2\n3,nan\n", 2),  # what float() reads as NaN
    ]
    + [(f"a,b\n1,2\n3,{token}\n", 2) for token in ["NA", "N/A", "NaN", "null", "None", "-", " NA "]],
)
def test_csv_blank_or_null_token_in_a_number_column_is_nan(tmp_path, content, row):
    table = parse_csv(write_file(tmp_path, content))
    b = table.column("b")
    assert b.dtype == np.float64
    assert np.isnan(b[row - 1])
    assert np.isfinite(np.delete(b, row - 1)).all()
    info = table.schema().column("b")
    assert info.missing == 1
    assert info.classes in ([2], [4])  # computed over the values present


def test_csv_whole_numbers_with_a_blank_are_float64_of_integer_kind(tmp_path):
    info = parse_csv(write_file(tmp_path, "a,b\n1,2\n3,\n")).schema().column("b")
    assert (info.dtype, info.kind, info.missing) == ("float64", "integer", 1)


def test_csv_blank_in_a_text_column_is_the_empty_string_and_not_a_class(tmp_path):
    table = parse_csv(write_file(tmp_path, "a,b\n1,x\n3,\n4,NA\n5,y\n"))
    assert table.column("b").tolist() == ["x", "", "", "y"]
    info = table.schema().column("b")
    assert (info.dtype, info.kind, info.missing, info.classes) == ("string", "category", 2, ["x", "y"])
    assert info.profile["missing_share"] == 0.5


def test_csv_null_tokens_are_configurable(tmp_path):
    path = write_file(tmp_path, "a,b\n1,?\n2,NA\n3,x\n")
    table = parse_csv(path, CsvOptions(na_values=("?",)))
    assert table.column("b").tolist() == ["", "NA", "x"]


def test_csv_mixed_column_is_a_category_with_a_warning_naming_the_words(tmp_path):
    table = parse_csv(write_file(tmp_path, "a,b\n1,2\n3,4\n5,abc\n6,7\n"))
    assert table.column("b").tolist() == ["2", "4", "abc", "7"]
    info = table.schema().column("b")
    assert info.kind == "category"
    (warning,) = info.profile["warnings"]
    assert "mixed column" in warning
    assert "row 3: 'abc'" in warning


def test_csv_word_in_a_later_block_names_the_right_row(tmp_path):
    n = 70_000
    rows = [f"{i},{i}" for i in range(n - 1)] + [f"{n - 1},oops"]
    table = parse_csv(write_file(tmp_path, "a,b\n" + "\n".join(rows) + "\n"))
    warnings = table.schema().column("b").profile["warnings"]
    assert any(f"row {n}: 'oops'" in w for w in warnings)


def test_csv_duplicate_header_names(tmp_path):
    error = csv_error(tmp_path, "a,b,a\n1,2,3\n")
    assert "'a'" in error.detail
    assert "twice" in error.detail
    assert "columns 1 and 3" in error.detail
    assert error.errors[0]["row"] == 1


def test_csv_duplicate_header_names_after_stripping(tmp_path):
    error = csv_error(tmp_path, "a, a\n1,2\n")
    assert "'a'" in error.detail
    assert "twice" in error.detail


@pytest.mark.parametrize("header", ["a,,c", "a, ,c"])
def test_csv_empty_header_name(tmp_path, header):
    error = csv_error(tmp_path, f"{header}\n1,2,3\n")
    assert "column 2" in error.detail
    assert "empty name" in error.detail
    assert error.errors[0]["row"] == 1
    assert error.errors[0]["column"] == 2


def test_csv_non_utf8_bytes(tmp_path):
    error = csv_error(tmp_path, b"a,b\n1,caf\xe9\n")
    assert "UTF-8" in error.detail
    assert "byte 9" in error.detail  # b"a,b\n1,caf" is 9 bytes long


def test_csv_non_utf8_byte_deep_in_the_file_is_located_correctly(tmp_path):
    body = b"a,b\n" + b"1,2\n" * 10_000  # 40,004 bytes of good data
    error = csv_error(tmp_path, body + b"3,\xff\n")
    # The bad byte is at offset 40,006, in data row 10,001 (line 10,002 of the file).
    where = ("byte 40006", "row 10001", "line 10002")
    assert any(w in error.detail for w in where), error.detail


@pytest.mark.parametrize(
    "garbage",
    [
        bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10",
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48\xcd\xc9\xc9\x07\x00",
    ],
    ids=["all-bytes", "png", "gzip"],
)
def test_csv_binary_garbage(tmp_path, garbage):
    error = csv_error(tmp_path, garbage)
    assert "UTF-8" in error.detail


def test_csv_unterminated_quote_at_the_end_reads_to_the_end(tmp_path):
    # pyarrow's reader, like pandas', closes a quote left open at the end of the file.
    table = parse_csv(write_file(tmp_path, 'a,b\n1,"2\n'))
    assert table.column("b").tolist() == [2]


# -- NPZ ---------------------------------------------------------------------------------------


def test_npz_x_with_integer_labels(tmp_path):
    x = np.array([[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]])
    path = write_npz(tmp_path, X=x, y=np.array([0, 1, 0]))
    table = parse_npz(path, max_elements=NPZ_LIMIT)

    assert table.names == ["x0", "x1", "y"]
    assert [c.dtype for c in table.columns] == [np.float64, np.float64, np.int64]
    np.testing.assert_array_equal(table.matrix(["x0", "x1"], dtype=np.float64), x)
    assert table.column("y").tolist() == [0, 1, 0]
    assert table.schema().column("y").classes == [0, 1]


def test_npz_two_dimensional_float_targets(tmp_path):
    y = np.array([[0.5, 1.5], [1.0, 2.25], [3.0, 4.75]])
    path = write_npz(tmp_path, X=np.zeros((3, 2), dtype=np.float32), y=y)
    table = parse_npz(path, max_elements=NPZ_LIMIT)

    assert table.names == ["x0", "x1", "y0", "y1"]
    assert all(c.dtype == np.float64 for c in table.columns)
    assert table.column("y0").tolist() == [0.5, 1.0, 3.0]
    assert table.column("y1").tolist() == [1.5, 2.25, 4.75]
    assert table.schema().column("y1").classes is None


def test_npz_string_labels(tmp_path):
    path = write_npz(tmp_path, X=np.arange(6).reshape(3, 2), y=np.array(["yes", "no", "yes"]))
    table = parse_npz(path, max_elements=NPZ_LIMIT)

    assert table.column("x0").dtype == np.int64
    assert table.column("y").dtype.kind == "U"
    assert table.column("y").tolist() == ["yes", "no", "yes"]
    info = table.schema().column("y")
    assert info.dtype == "string"
    assert info.classes == ["no", "yes"]


def test_npz_one_dimensional_x_is_one_feature(tmp_path):
    table = parse_npz(write_npz(tmp_path, X=np.array([1.0, 2.0]), y=np.array([3.0, 4.0])), max_elements=NPZ_LIMIT)
    assert table.names == ["x0", "y"]
    assert table.column("x0").tolist() == [1.0, 2.0]


@pytest.mark.parametrize("missing", ["X", "y"])
def test_npz_missing_array(tmp_path, missing):
    arrays = {"X": np.zeros((2, 2)), "y": np.zeros(2)}
    del arrays[missing]
    error = npz_error(write_npz(tmp_path, **arrays))
    assert f"no array named {missing!r}" in error.detail


def test_npz_mismatched_lengths(tmp_path):
    error = npz_error(write_npz(tmp_path, X=np.zeros((3, 2)), y=np.zeros(2)))
    assert "3 rows" in error.detail
    assert "2" in error.detail


def test_npz_no_rows(tmp_path):
    error = npz_error(write_npz(tmp_path, X=np.zeros((0, 2)), y=np.zeros(0)))
    assert "no rows" in error.detail


@pytest.mark.parametrize("which", ["X", "y"])
def test_npz_object_arrays_are_refused_not_unpickled(tmp_path, which):
    arrays = {"X": np.zeros((2, 1)), "y": np.zeros(2)}
    arrays[which] = np.array([{"a": 1}, None], dtype=object).reshape(arrays[which].shape)
    error = npz_error(write_npz(tmp_path, **arrays))
    assert repr(which) in error.detail
    assert "cannot be read" in error.detail


def test_npz_text_features_are_refused(tmp_path):
    error = npz_error(write_npz(tmp_path, X=np.array([["a"], ["b"]]), y=np.array([0, 1])))
    assert "X must hold numbers" in error.detail


def test_npz_byte_string_labels_are_refused(tmp_path):
    error = npz_error(write_npz(tmp_path, X=np.zeros((2, 1)), y=np.array([b"a", b"b"])))
    assert "y must hold numbers or strings" in error.detail


def test_npz_non_finite_value_is_named(tmp_path):
    error = npz_error(write_npz(tmp_path, X=np.array([[1.0, 2.0], [3.0, np.inf]]), y=np.array([0, 1])))
    assert "row 2" in error.detail
    assert "'x1'" in error.detail
    assert error.errors[0]["column"] == "x1"


def test_npz_element_limit(tmp_path):
    error = npz_error(write_npz(tmp_path, X=np.zeros((50, 2)), y=np.zeros(50)), max_elements=99)
    assert "'X'" in error.detail
    assert "100 elements" in error.detail
    assert "limit is 99" in error.detail


def test_npz_element_limit_is_checked_before_decompressing(tmp_path):
    # 32 MB of zeros deflate to about 60 KB: a small upload must not be expanded in memory
    # before the element limit turns it away (a zip bomb).
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, X=np.zeros((4_000_000, 1)), y=np.zeros(4_000_000))
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        error = npz_error(path, max_elements=1_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "limit is 1000" in error.detail
    assert peak < 8_000_000, f"parse_npz allocated {peak / 1e6:.1f} MB before refusing the array"


@pytest.mark.parametrize("content", [b"x0,y\n1,2\n", b""], ids=["csv-text", "empty"])
def test_npz_not_a_zip(tmp_path, content):
    error = npz_error(write_file(tmp_path, content, "data.npz"))
    assert "not a readable .npz archive" in error.detail


def test_npz_corrupt_zip_is_refused_without_leaking_the_open_file(tmp_path):
    path = write_file(tmp_path, b"PK\x03\x04" + b"\x00" * 40, "data.npz")  # zip magic, then nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InvalidInput, match=r"not a readable \.npz archive"):
            parse_npz(path, max_elements=NPZ_LIMIT)
        gc.collect()  # the error is gone: anything it kept alive is collected now
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []


def test_npz_members_that_are_not_arrays_are_refused(tmp_path):
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as archive:  # named X and y, but no .npy inside
        archive.writestr("X", "1,2\n3,4\n")
        archive.writestr("y", "0\n1\n")
    error = npz_error(path)
    assert "'X'" in error.detail


def test_npz_zip_without_arrays(tmp_path):
    path = tmp_path / "other.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    error = npz_error(path)
    assert "no array named 'X'" in error.detail


# -- sniff_format --------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["data.npz", "data.csv", "upload", None])
def test_sniff_zip_magic_means_npz_whatever_the_name(filename):
    assert sniff_format(filename, b"PK\x03\x04") == "npz"


@pytest.mark.parametrize("filename", ["data.csv", "data.txt", None, ""])
def test_sniff_text_means_csv(filename):
    assert sniff_format(filename, b"a,b\n") == "csv"


@pytest.mark.parametrize("filename", ["data.npz", "DATA.NPZ"])
def test_sniff_npz_name_without_zip_magic_is_refused(filename):
    with pytest.raises(InvalidInput, match="not a zip archive"):
        sniff_format(filename, b"a,b\n")


# -- stored tables ---------------------------------------------------------------------------------


def test_write_table_then_read_table_round_trip(tmp_path):
    table = Table(
        ["i", "f", "s"],
        [
            np.array([3, -1, 2**40], dtype=np.int64),
            np.array([0.1, -2.5, 1e300], dtype=np.float64),
            np.array(["a", "héllo", "long label"], dtype=np.str_),
        ],
    )
    path = tmp_path / "table.npz"
    with open(path, "wb") as handle:
        write_table(table, handle)

    for memory_map in (True, False):
        loaded = read_table(path, memory_map=memory_map)
        assert loaded.names == ["i", "f", "s"]
        assert [c.dtype for c in loaded.columns] == [c.dtype for c in table.columns]
        for original, restored in zip(table.columns, loaded.columns, strict=True):
            np.testing.assert_array_equal(restored, original)
        assert loaded.schema() == table.schema()
        assert bool(loaded.mapped) == memory_map


def test_stored_columns_are_memory_mapped_not_read(tmp_path):
    n = 200_000
    table = Table(["a", "b"], [np.arange(n, dtype=np.float64), np.arange(n, dtype=np.int64) % 7])
    path = tmp_path / "big.npz"
    with open(path, "wb") as handle:
        write_table(table, handle)
    loaded = read_table(path)
    column = loaded.column("a")
    assert isinstance(column.base, memoryview)  # a view of the file's mapping, not a copy in memory
    assert isinstance(column.base.obj, mmap.mmap)
    assert not column.flags.writeable
    assert column[123_456] == 123_456.0
    np.testing.assert_array_equal(loaded.matrix(["a", "b"])[-1], [n - 1, (n - 1) % 7])
    empty = Table(["z"], [np.array([], dtype=np.float64)])
    with open(tmp_path / "empty.npz", "wb") as handle:
        write_table(empty, handle)
    assert read_table(tmp_path / "empty.npz").column("z").shape == (0,)


@pytest.mark.parametrize("n", [5, 16_384 * 9 + 77])  # one block; many blocks over the threads, a ragged end
def test_matrix_matches_the_columns_mapped_or_not_and_after_its_pages_are_released(tmp_path, n):
    rng = np.random.default_rng(0)
    columns = [rng.normal(size=n), rng.integers(-5, 5, size=n), rng.normal(size=n) * 1e3]
    path = tmp_path / "t.npz"
    with open(path, "wb") as handle:
        write_table(Table(["a", "b", "c"], columns), handle)
    expected = np.column_stack([columns[2], columns[0], columns[1]])
    for memory_map in (True, False):
        loaded = read_table(path, memory_map=memory_map)
        for _ in range(2):  # a second build reads pages the first released
            np.testing.assert_array_equal(loaded.matrix(["c", "a", "b"]), expected.astype(np.float32))
        as_float64 = loaded.matrix(["c", "a", "b"], dtype=np.float64)
        assert as_float64.flags.c_contiguous
        np.testing.assert_array_equal(as_float64, expected)
        np.testing.assert_array_equal(loaded.column("a"), columns[0])


def test_parsed_csv_survives_the_round_trip(tmp_path):
    parsed = parse_csv(write_file(tmp_path, "x,y,label\n1,0.25,b\n2,0.5,a\n"))
    path = tmp_path / "stored.npz"
    with open(path, "wb") as handle:
        write_table(parsed, handle)
    with np.load(path, allow_pickle=False) as archive:  # loadable without pickles
        assert "names" in archive.files
    loaded = read_table(path)
    assert loaded.names == parsed.names
    assert loaded.schema() == parsed.schema()
    assert loaded.column("label").tolist() == ["b", "a"]
