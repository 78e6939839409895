"""Bulk request bodies: the exact bytes the API receives."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl

from loader.payloads import encode_body


def test_body_shape_escaping_and_omitted_nulls():
    rows = pl.DataFrame({
        "date": [dt.date(2024, 1, 2), dt.date(2024, 2, 29)],
        "data_stream_key": ["ops", "ops"],
        "amount": [-1234, 5],
        "currency": ["USD", "JPY"],
        "direction": [None, "credit"],
        "description": ['a "quoted" </script>\n é', None],
        "external_id": ["X1", None],
        "metadata": ['{"k": [1, {"n": null}]}', "{}"],
    })
    body = json.loads(encode_body(rows, on_conflict="error"))
    assert body["on_conflict"] == "error"
    assert body["records"] == [
        {"date": "2024-01-02", "data_stream_key": "ops", "amount": -1234, "currency": "USD",
         "description": 'a "quoted" </script>\n é', "external_id": "X1", "metadata": {"k": [1, {"n": None}]}},
        {"date": "2024-02-29", "data_stream_key": "ops", "amount": 5, "currency": "JPY", "direction": "credit",
         "metadata": {}},
    ]
    assert isinstance(body["records"][0]["amount"], int)
