"""e2e fixtures: ``topology`` (client/engine/server namespaces around a real TUN), see topology.py.

Choose the TUN's options per test with ``@pytest.mark.topology(vnet_hdr=True, mtu=1500)`` or indirect
parametrization (``@pytest.mark.parametrize("topology", [{"vnet_hdr": True}], indirect=True)``).
Without root or /dev/net/tun every test using the fixture is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

# ``tests.e2e`` resolves from the project root, which pyproject's ``[tool.pytest.ini_options] pythonpath``
# puts on sys.path for plain ``pytest`` as well as ``python -m pytest``, before any conftest is imported.
from tests.e2e.topology import Topology, e2e_skip_reason, reap_stale_namespaces


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "topology(vnet_hdr=False, mtu=1500, multi_queue=False): options of the e2e topology fixture")


@pytest.fixture(scope="session", autouse=True)
def _namespace_safety_net() -> Iterator[None]:
    """Before: remove namespaces of dead earlier runs. After: anything of ours a teardown missed."""
    if e2e_skip_reason() is None:
        reap_stale_namespaces()
    yield
    if e2e_skip_reason() is None:
        reap_stale_namespaces(current_session_only=True)


@pytest.fixture
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    reason = e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    options: dict[str, Any] = {}
    marker = request.node.get_closest_marker("topology")
    if marker is not None:
        options.update(marker.kwargs)
    options.update(getattr(request, "param", None) or {})
    topo = Topology.create(vnet_hdr=bool(options.get("vnet_hdr", False)), mtu=int(options.get("mtu", 1500)),
                           multi_queue=bool(options.get("multi_queue", False)))
    try:
        yield topo
    finally:
        errors = topo.close()
        logs = topo.logs()
        if logs:
            print(logs)  # shown by pytest for a failing test
        assert not errors, f"topology teardown failed: {errors}"
