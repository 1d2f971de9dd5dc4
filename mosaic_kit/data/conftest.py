"""Doctests of the released-layout reader share a one-row data set (the module docstring's)."""

import io

import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _released_data_set(doctest_namespace, tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    encoded = io.BytesIO()
    Image.new("RGB", (1048, 528), "white").save(encoded, format="PNG")
    row = {"image": {"bytes": encoded.getvalue(), "path": None},
           "description": {"item": "dog", "description_0": "a dog", "description_1": "the dog"}}
    parquet.write_table(pyarrow.Table.from_pylist([row]), tmp_path / "train-0.parquet")
    doctest_namespace["root"] = tmp_path
