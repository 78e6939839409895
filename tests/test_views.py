"""Registering Arrow data as a view for one block of SQL (loader.views)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from loader.views import registered


def test_the_view_exists_inside_the_block_only():
    con = duckdb.connect()
    with registered(con, "_numbers", pa.table({"n": [1, 2, 3]})):
        assert con.execute("select sum(n) from _numbers").fetchall() == [(6,)]
    with pytest.raises(duckdb.CatalogException):
        con.execute("select * from _numbers")


def test_a_failure_inside_a_transaction_is_the_error_raised():
    # The failed statement aborts the transaction, so unregistering fails as well; the error
    # that reaches the caller must still be the statement's own.
    con = duckdb.connect()
    con.execute("create table t (n integer not null)")
    con.execute("begin transaction")
    with pytest.raises(duckdb.ConstraintException, match="NOT NULL"):
        with registered(con, "_rows", pa.table({"n": pa.array([1, None], pa.int32())})):
            con.execute("insert into t select n from _rows")
    con.execute("rollback")
    assert con.execute("select count(*) from t").fetchall() == [(0,)]
