"""Fixtures for dns_filter tests: a harness wired to a real DNS server on 127.0.0.1 (dnsfilter_support)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dnsfilter_support import DnsBench


@pytest.fixture
def dns_bench() -> Iterator[Any]:
    benches: list[DnsBench] = []

    def make(config: dict[str, Any] | None = None, **kw: Any) -> DnsBench:
        bench = DnsBench(config or {}, **kw)
        benches.append(bench)
        return bench

    yield make
    for bench in benches:
        bench.close()
