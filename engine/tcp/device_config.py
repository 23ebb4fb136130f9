"""A plugin's :class:`~engine.tcp.config.TcpConfig` for the device as attached now.

A module of its own so that the compiled build compiles it: tcp_forward asks for the config on every
SYN, and in engine/tcp/config.py (pure Python: attrs) the call was an interpreted frame per connection.
"""

from __future__ import annotations

from typing import Any, Optional

from engine.tcp.config import MAX_GSO_BYTES, TcpConfig

__all__ = ["DeviceTcpConfig"]


class DeviceTcpConfig:
    """A plugin's :class:`TcpConfig` for the device as attached now, rebuilt only when the MTU or the
    offloads change (both are known only once a device is attached, and a reload may re-attach).

    ``options`` are the plugin's own settings (buffers, keepalive, timeouts); the MTU and the GSO size
    come from the engine. One place for what tcp_forward and dns_filter's TCP server both need.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._mtu = 0
        self._offload = False
        self._config: Optional[TcpConfig] = None

    def for_device(self, mtu: int, offload: bool) -> TcpConfig:
        config = self._config
        if config is None or mtu != self._mtu or offload != self._offload:
            config = self._config = TcpConfig(mtu=mtu, max_gso_bytes=MAX_GSO_BYTES if offload else 0, **self._options)
            self._mtu = mtu
            self._offload = offload
        return config
