"""The store of a test, on both backends: a local folder and S3 (moto's server on loopback).

Test modules that need only one backend define their own `store`, which takes precedence."""

import pytest

from humpback_runtime.storage import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(f"{request.getfixturevalue('s3_bucket')}/root", endpoint_url=request.getfixturevalue("s3_server"))
