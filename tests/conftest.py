"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fresh_accelerate_state():
    """A clean Accelerate singleton before and after the test (one process can hold only one precision)."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
