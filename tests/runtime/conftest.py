"""Runtime tests need the compiled custom-op library (`make lib`); without it they fail with the reason."""

from __future__ import annotations

import pytest

from preserve_onnx.errors import PreserveError
from preserve_onnx.runtime import library_path


@pytest.fixture(autouse=True)
def _custom_op_library():
    try:
        return library_path()
    except PreserveError as exc:
        pytest.fail(str(exc))
