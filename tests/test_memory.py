"""trim_memory: what a process frees goes back to the operating system (glibc's trim
threshold 0, as MALLOC_TRIM_THRESHOLD_=0 would set), asked once per process, and not at all
with trim_memory = false."""

from __future__ import annotations

import ctypes
from typing import ClassVar

import pytest

from hfedmoe.foundation import memory


class Mallopt:
    """A C function's stand-in: takes ctypes' argtypes and restype, records its calls."""

    def __call__(self, param: int, value: int) -> int:
        FakeLibc.calls.append((param, value))
        return 1


class FakeLibc:
    """Records mallopt's calls instead of changing this test process's allocator."""

    calls: ClassVar[list[tuple[int, int]]] = []

    def __init__(self, name):
        assert name is None  # the C library the process already runs on
        self.mallopt = Mallopt()


@pytest.fixture
def libc(monkeypatch):
    FakeLibc.calls = []
    memory.return_freed_memory.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", FakeLibc)
    yield FakeLibc
    memory.return_freed_memory.cache_clear()


def test_the_trim_threshold_is_set_to_zero_once_per_process(libc):
    assert memory.return_freed_memory() is True
    assert memory.return_freed_memory() is True
    assert libc.calls == [(memory.M_TRIM_THRESHOLD, 0)]


def test_a_platform_without_mallopt_is_left_as_it_is(monkeypatch):
    memory.return_freed_memory.cache_clear()

    def no_libc(name):
        raise TypeError("no CDLL(None) here")  # what Windows raises

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert memory.return_freed_memory() is False
    memory.return_freed_memory.cache_clear()


@pytest.mark.parametrize("trim", [True, False])
def test_a_client_asks_for_it_as_its_config_says(libc, tiny_bert_dir, trim):
    from flwr.app import Context, RecordDict

    from hfedmoe.federation import client_app, wire
    from hfedmoe.foundation.config import validate

    from .support.configs import tiny_raw

    cfg = validate(tiny_raw(tiny_bert_dir, trim_memory=trim))
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={wire.RUN_CONFIG: cfg.to_json()},
    )
    client_app._node(context)
    assert libc.calls == ([(memory.M_TRIM_THRESHOLD, 0)] if trim else [])
