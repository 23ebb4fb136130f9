"""`dnsgate demo` runs its whole scenario on a fresh namespace "internet" and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.linux import netns as nl
from tests.e2e.topology import REPO_ROOT, e2e_skip_reason

pytestmark = pytest.mark.e2e


def demo_namespaces() -> set[str]:
    return {name for name in nl.list_netns() if name.startswith("dgdemo")}


def test_demo_completes_and_cleans_up() -> None:
    reason = e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    before = demo_namespaces()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "demo"], capture_output=True, text=True, timeout=90,
                          cwd=REPO_ROOT, env={"COLUMNS": "100", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert "demo complete: every step behaved" in out
    assert out.count("✓") == 6 and "✗" not in out
    assert "connection reset by the engine" in out
    assert "expired" in out  # the block line names what the address was and when it expired
    assert "mode firewall -> dns-only" in out
    assert "DNS-ONLY" in out and "recent blocks" in out  # the dashboard summary
    leftovers = demo_namespaces() - before
    assert not leftovers, f"demo left namespaces behind: {leftovers}"
