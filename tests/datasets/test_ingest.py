"""The upload data contract: delimiters, decimal commas, null tokens, booleans, Parquet,
old stored schemas, and the per-column profile with its warnings."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainserve.datasets.tables import (
    ColumnInfo,
    CsvOptions,
    TableSchema,
    parse_csv,
    parse_parquet,
    parse_table,
    read_table,
    sniff_format,
    write_table,
)
from trainserve.errors import InvalidInput


def _col(schema: TableSchema, name: str) -> ColumnInfo:
    column = schema.column(name)
    assert column is not None, name
    return column


def write(tmp_path: Path, content: str | bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


ROWS = [("1.5", "2", "a"), ("2.25", "3", "b"), ("", "4", "a")]


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "pipe"])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_every_delimiter_is_sniffed(tmp_path, delimiter, bom):
    text = "\n".join(delimiter.join(row) for row in [("x1", "x2", "label"), *ROWS]) + "\n"
    table = parse_csv(write(tmp_path, ("\ufeff" if bom else "") + text))
    assert table.names == ["x1", "x2", "label"]
    assert table.delimiter == delimiter
    assert np.array_equal(table.column("x1"), [1.5, 2.25, np.nan], equal_nan=True)
    assert table.column("x2").tolist() == [2, 3, 4]
    assert table.column("label").tolist() == ["a", "b", "a"]


def test_semicolon_with_decimal_commas(tmp_path):
    table = parse_csv(write(tmp_path, "x;y;label\n1,5;2;a\n-0,25;3;b\n;4;a\n"))
    assert (table.delimiter, table.decimal) == (";", ",")
    assert np.array_equal(table.column("x"), [1.5, -0.25, np.nan], equal_nan=True)
    assert table.column("y").dtype == np.int64


def test_tsv_extension_breaks_a_tie_for_tab(tmp_path):
    table = parse_csv(write(tmp_path, "only\n1\n2\n", "data.tsv"), filename="data.tsv")
    assert table.names == ["only"]
    assert table.delimiter == "\t"


def test_form_options_override_the_guesses(tmp_path):
    path = write(tmp_path, "a;b\n1,5;2\n")
    table = parse_csv(path, CsvOptions(delimiter=";", decimal="."))
    assert table.column("a").tolist() == ["1,5"]  # a decimal point was asked for: 1,5 is text


def test_one_column_whose_name_holds_another_delimiter_is_refused(tmp_path):
    with pytest.raises(InvalidInput) as info:
        parse_csv(write(tmp_path, "x1\tx2\tlabel\n1\t2\ta\n"), CsvOptions(delimiter=","))
    assert "tab" in info.value.detail
    assert "'delimiter'" in info.value.detail
    assert info.value.errors[0]["loc"] == ["body", "delimiter"]


def test_ragged_row_names_the_row_and_the_delimiter(tmp_path):
    with pytest.raises(InvalidInput) as info:
        parse_csv(write(tmp_path, "a;b\n1;2\n3;4;5\n6;7\n"))
    assert "row 2 has 3 fields, the header has 2" in info.value.detail
    assert "semicolon" in info.value.detail
    assert info.value.errors[0]["row"] == 2


def test_booleans_are_float_zero_one_and_zero_one_stays_integer(tmp_path):
    table = parse_csv(write(tmp_path, "b,i\ntrue,0\nFALSE,1\n,1\nTrue,0\n"))
    assert np.array_equal(table.column("b"), [1.0, 0.0, np.nan, 1.0], equal_nan=True)
    assert table.column("i").dtype == np.int64
    schema = table.schema()
    assert _col(schema, "b").kind == "boolean"
    assert _col(schema, "b").dtype == "float64"
    assert _col(schema, "b").missing == 1
    assert _col(schema, "i").kind == "integer"


def test_profile_of_numbers_and_categories(tmp_path):
    rows = "".join(f"{i % 4},{'ab'[i % 2] if i % 5 else ''},{i * 0.5}\n" for i in range(20))
    schema = parse_csv(write(tmp_path, "n,c,f\n" + rows)).schema()
    f = _col(schema, "f").profile
    assert (f["kind"], f["min"], f["max"], f["distinct"], f["missing"]) == ("number", 0, 9.5, 20, 0)
    assert f["mean"] == pytest.approx(4.75)
    c = _col(schema, "c").profile
    assert (c["missing"], c["missing_share"], c["distinct"]) == (4, 0.2, 2)
    assert c["top"] == [{"value": "a", "count": 8}, {"value": "b", "count": 8}]


def test_profile_warnings(tmp_path):
    n = 200
    rows = [f"{i},same,{'x' if i < 150 else ''},{'rare' if i == 0 else 'common'},c{i % 50}" for i in range(n)]
    schema = parse_csv(write(tmp_path, "id,const,sparse,label,many\n" + "\n".join(rows))).schema(category_limit=10)
    warnings = {c.name: " | ".join(c.profile["warnings"]) for c in schema.columns}
    assert "constant" in warnings["const"]
    assert warnings["id"] == ""  # an integer counter is not text
    assert "missing in most rows" not in warnings["sparse"]
    assert "rare" in warnings["label"]
    assert "1 of 200" in warnings["label"]
    assert "very high cardinality: 50" in warnings["many"]
    text_ids = parse_csv(write(tmp_path, "id\n" + "\n".join(f"u{i}" for i in range(20)))).schema()
    assert "looks like an id" in text_ids.columns[0].profile["warnings"][0]
    sparse = parse_csv(write(tmp_path, "s,t\n" + "\n".join(f"{i if i < 3 else ''},1" for i in range(10)))).schema()
    assert any("missing in most rows (7 of 10)" in w for w in _col(sparse, "s").profile["warnings"])


def test_infinity_is_still_refused(tmp_path):
    with pytest.raises(InvalidInput, match="not a finite number"):
        parse_csv(write(tmp_path, "a\n1.5\ninf\n"))


def test_old_stored_schema_without_kind_missing_or_profile():
    schema = TableSchema.from_dicts(
        3,
        [
            {"name": "a", "dtype": "int64", "classes": [1]},
            {"name": "b", "dtype": "float64", "classes": None},
            {"name": "c", "dtype": "string", "classes": ["x"]},
        ],
    )
    assert [(c.kind, c.missing, c.profile) for c in schema.columns] == [
        ("integer", 0, {}),
        ("number", 0, {}),
        ("category", 0, {}),
    ]
    assert ColumnInfo("d", "string").kind == "category"
    new = schema.columns[0].as_dict()
    assert set(new) == {"name", "dtype", "classes", "kind", "missing", "profile"}
    assert TableSchema.from_dicts(3, [new]).columns[0] == schema.columns[0]


def test_parquet_types_follow_the_contract(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(
        pa.table(
            {
                "i": pa.array([1, 2, 3]),
                "j": pa.array([1, None, 3]),
                "f": pa.array([0.5, None, 1.5]),
                "b": pa.array([True, None, False]),
                "s": pa.array(["a", None, "b"]).dictionary_encode(),
            }
        ),
        path,
    )
    assert sniff_format("x.bin", path.read_bytes()[:4]) == "parquet"
    table = parse_table(path, "parquet", max_elements=1000)
    assert table.column("i").dtype == np.int64
    assert np.array_equal(table.column("j"), [1, np.nan, 3], equal_nan=True)
    assert np.array_equal(table.column("b"), [1.0, np.nan, 0.0], equal_nan=True)
    assert table.column("s").tolist() == ["a", "", "b"]
    kinds = [c.kind for c in table.schema().columns]
    assert kinds == ["integer", "integer", "number", "boolean", "category"]
    with pytest.raises(InvalidInput, match="not a readable Parquet"):
        parse_parquet(write(tmp_path, b"PAR1 and then nothing", "bad.parquet"))


def test_columns_with_blanks_survive_the_stored_round_trip(tmp_path):
    table = parse_csv(write(tmp_path, "a,b\n1,x\n,\n3,y\n"))
    buffer = io.BytesIO()
    write_table(table, buffer)
    (tmp_path / "t.npz").write_bytes(buffer.getvalue())
    back = read_table(tmp_path / "t.npz")
    assert np.array_equal(back.column("a"), [1.0, np.nan, 3.0], equal_nan=True)
    assert back.column("b").tolist() == ["x", "", "y"]
    assert _col(back.schema(), "b").classes == ["x", "y"]


def test_a_line_break_inside_quotes_stays_in_its_value(tmp_path):
    table = parse_csv(write(tmp_path, 'a,b\n1,"x\ny"\n2,z\n'))
    assert table.column("b").tolist() == ["x\ny", "z"]
    assert table.column("a").tolist() == [1, 2]


def test_a_header_longer_than_the_sniffed_sample(tmp_path):
    names = [f"column_number_{j}" for j in range(5000)]  # about 90 KB of header
    table = parse_csv(write(tmp_path, ";".join(names) + "\n" + ";".join("1" for _ in names) + "\n"))
    assert table.names == names
    assert table.delimiter == ";"
