"""Linux TUN device: create/adopt, vnet headers + offloads, batched zero-copy reads, non-blocking writes.

Why these choices (the measurements are in docs/architecture.md §10, the performance model):

* ``IFF_VNET_HDR`` + ``TUNSETOFFLOAD(CSUM|TSO4|TSO6|TSO_ECN|USO4|USO6)`` lets the kernel hand us GRO
  super-packets of up to ~64 KB and accept GSO super-packet writes: ~15x the throughput and ~20x less CPU
  per MB than one syscall per 1500-byte packet. USO needs kernel >= 6.2 and both USO bits together; on
  EINVAL we retry without USO (then without ECN) rather than giving up offloads altogether.
* Reads go with ``readinto`` into one preallocated arena (~1 us per call, no allocation); each read gets
  a full 65,545-byte slot (10-byte vnet header + 64 KiB) so a super-packet is never truncated. The views
  returned by ``read_batch`` point into the arena and are valid until the next ``read_batch``.
* The fd is non-blocking; writes that meet a full queue are dropped and counted (see ``engine.io.base``).
* ``txqueuelen`` is raised (default 500 lost 75% of a 2,000-datagram burst here; 5,000 lost none): the
  TUN queue is where the kernel parks packets for us while Python is busy.
* Namespaces: a TUN is bound to the namespace of the thread that *opened* ``/dev/net/tun``. ``open(...,
  netns=NAME)`` switches the current thread into NAME for the open and the ioctls (``engine.linux.netns.
  in_netns``), then back; the engine then serves from its own namespace a TUN living in the client's.
  For an adopted fd, ``TUNGETDEVNETNS`` finds the device's namespace so MTU and txqueuelen can be read
  and set there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Iterator

from engine.io.base import DeviceCounters, ReadBatch
from engine.linux.netns import in_netns
from engine.io.tun_queue import READ_SLOT, TunQueueIO  # READ_SLOT: the largest read, re-exported
from engine.packet import VNET_HDR_LEN, VnetHeader

log = logging.getLogger(__name__)

# ioctls (linux/if_tun.h, linux/sockios.h)
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETDEVNETNS = 0x000054E3
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCGIFTXQLEN = 0x8942
SIOCSIFTXQLEN = 0x8943

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
OFFLOAD_FULL = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_USO4 | TUN_F_USO6
OFFLOAD_TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
# Tried in order: the first the kernel accepts wins (older kernels reject USO, very old ones ECN).
OFFLOAD_CANDIDATES = (OFFLOAD_FULL, OFFLOAD_TSO, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)

IFNAMSIZ = 16
DEFAULT_TXQUEUELEN = 5000
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INT = struct.Struct("16si20x")


class TunError(OSError):
    """Opening or configuring the TUN failed; the message says which step and why."""


def tun_features() -> int:
    """The ``IFF_*`` flags this kernel's TUN driver supports (``TUNGETFEATURES``)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, TUNGETFEATURES, bytes(4))
        return int(struct.unpack("I", buf)[0])
    finally:
        os.close(fd)


def get_tun_info(fd: int) -> tuple[str, int]:
    """``(name, IFF_* flags)`` of the TUN behind ``fd`` (``TUNGETIFF``)."""
    try:
        res = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ_FLAGS.size))
    except OSError as exc:
        raise TunError(exc.errno, f"fd {fd} is not an attached TUN device (TUNGETIFF: {exc.strerror})") from None
    raw_name, flags = _IFREQ_FLAGS.unpack(res)
    return raw_name.rstrip(b"\0").decode(), int(flags)


def _ifreq_int(name: str, value: int = 0) -> bytes:
    return _IFREQ_INT.pack(name.encode(), value)


def _get_int(sock: socket.socket, request: int, name: str) -> int:
    return int(_IFREQ_INT.unpack(fcntl.ioctl(sock.fileno(), request, _ifreq_int(name)))[1])


class TunDevice:
    """A Linux TUN queue implementing :class:`engine.io.base.PacketDevice`.

    Build it with :meth:`open` (create or attach by name) or :meth:`from_fd` (an inherited fd, as the
    benchmark and ``dnsgate exec`` hand over). The device owns the fd and closes it in :meth:`close`.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        *,
        vnet_hdr: bool,
        offload_flags: int,
        mtu: int,
        txqueuelen: int | None = None,
        owns_fd: bool = True,
    ) -> None:
        self._fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offload_flags = offload_flags
        self.offload = vnet_hdr and bool(offload_flags & (TUN_F_TSO4 | TUN_F_TSO6))
        self.mtu = mtu
        self.txqueuelen = txqueuelen
        self.counters = DeviceCounters()
        self._owns_fd = owns_fd
        os.set_blocking(fd, False)
        # The packet I/O itself (engine/io/tun_queue.py, compiled in the compiled build). Its methods are bound
        # on the instance, shadowing the delegating methods below: the pipeline's reads and the engine's writes
        # then reach compiled code without an interpreted frame of TunDevice's own on every packet.
        self._io = TunQueueIO(fd, name, vnet_hdr, self.offload, mtu, self.counters)
        self.read_batch = self._io.read_batch  # type: ignore[method-assign]
        self.write = self._io.write  # type: ignore[method-assign]
        self.write_gso = self._io.write_gso  # type: ignore[method-assign]

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        name: str = "",
        *,
        vnet_hdr: bool = False,
        offload: bool = True,
        netns: str | None = None,
        mtu: int | None = None,
        txqueuelen: int | None = DEFAULT_TXQUEUELEN,
        multi_queue: bool = False,
    ) -> TunDevice:
        """Create the TUN ``name`` (or attach to an existing, unattached/persistent one) in ``netns``.

        ``name=""`` lets the kernel pick ``tunN``. With ``vnet_hdr`` the device carries virtio-net
        headers and, with ``offload``, enables checksum/TSO/USO offloads. ``mtu`` (if given) and
        ``txqueuelen`` are set on the link; bringing it up, addresses and routes are engine/linux's job.
        """
        if len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
        with in_netns(netns):
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
            try:
                try:
                    res = fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(name.encode(), flags))
                except OSError as exc:
                    hint = " (is the device attached to another process?)" if exc.errno == errno.EBUSY else ""
                    raise TunError(exc.errno, f"TUNSETIFF {name or '<auto>'}: {exc.strerror}{hint}") from None
                real_name = _IFREQ_FLAGS.unpack(res)[0].rstrip(b"\0").decode()
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                    dev_mtu, txq = _configure_link(ctl, real_name, mtu, txqueuelen)
                offload_flags = _setup_vnet(fd, offload) if vnet_hdr else 0
            except BaseException:
                os.close(fd)
                raise
        log.info(
            "TUN %s opened%s: vnet_hdr=%s offloads=%#x mtu=%d txqueuelen=%s",
            real_name, f" in netns {netns}" if netns else "", vnet_hdr, offload_flags, dev_mtu, txq,
        )
        return cls(fd, real_name, vnet_hdr=vnet_hdr, offload_flags=offload_flags, mtu=dev_mtu, txqueuelen=txq)

    @classmethod
    def from_fd(
        cls,
        fd: int,
        vnet_hdr: bool | None = None,
        *,
        offload: bool = True,
        mtu: int | None = None,
        txqueuelen: int | None = DEFAULT_TXQUEUELEN,
    ) -> TunDevice:
        """Adopt an inherited TUN fd (the device may live in another namespace).

        ``vnet_hdr`` is what the caller was told (e.g. ``--vnet-hdr``); the fd's own flags (``TUNGETIFF``)
        are authoritative and a contradiction is an error, because guessing wrong would shift every
        packet by 10 bytes. ``None`` means "detect". ``mtu`` overrides the link's MTU as the engine's idea
        of it without changing the link (the device's owner configured it).
        """
        name, flags = get_tun_info(fd)
        actual = bool(flags & IFF_VNET_HDR)
        if vnet_hdr is not None and vnet_hdr != actual:
            raise TunError(
                errno.EINVAL,
                f"TUN {name} (fd {fd}) was opened {'with' if actual else 'without'} IFF_VNET_HDR, "
                f"but vnet_hdr={vnet_hdr} was requested",
            )
        offload_flags = _setup_vnet(fd, offload) if actual else 0
        link_mtu, txq = 1500, None
        try:
            with device_netns(fd), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                link_mtu, txq = _configure_link(ctl, name, None, txqueuelen)
        except OSError as exc:
            log.warning("TUN %s: cannot read MTU / set txqueuelen in its namespace: %s", name, exc)
        log.info(
            "TUN %s adopted from fd %d: vnet_hdr=%s offloads=%#x mtu=%d txqueuelen=%s",
            name, fd, actual, offload_flags, mtu or link_mtu, txq,
        )
        return cls(fd, name, vnet_hdr=actual, offload_flags=offload_flags, mtu=mtu or link_mtu, txqueuelen=txq)

    # --- PacketDevice ------------------------------------------------------------------------------

    def fileno(self) -> int | None:
        return self._fd

    def read_batch(self, max_packets: int = 128) -> ReadBatch:
        """Read until EAGAIN, ``max_packets`` or the arena is full; views valid until the next call."""
        return self._io.read_batch(max_packets)

    def write(self, packet: bytes | bytearray | memoryview) -> None:
        """One complete packet; with vnet headers a zero header goes first (``writev``: no copy)."""
        self._io.write(packet)

    def write_gso(self, packet: bytes | bytearray | memoryview, vnet: VnetHeader) -> None:
        """One super-packet the kernel segments per ``vnet`` (offload devices only)."""
        self._io.write_gso(packet, vnet)

    @property
    def lost(self) -> str | None:
        """Why the device can no longer be used (set when a read finds the interface deleted), else None."""
        return self._io.lost

    @lost.setter
    def lost(self, reason: str | None) -> None:
        self._io.lost = reason

    def close(self) -> None:
        if self._fd < 0:
            return
        self._io.close()
        if self._owns_fd:
            os.close(self._fd)
        self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TunDevice(name={self.name!r}, fd={self._fd}, vnet_hdr={self.vnet_hdr}, "
            f"offload={self.offload_flags:#x}, mtu={self.mtu})"
        )


def _setup_vnet(fd: int, offload: bool) -> int:
    """Header size 10 and the richest offload set the kernel accepts; returns the offload flags (0 = none)."""
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    except OSError as exc:
        raise TunError(exc.errno, f"TUNSETVNETHDRSZ {VNET_HDR_LEN}: {exc.strerror}") from None
    if not offload:
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        return 0
    last: OSError | None = None
    for flags in OFFLOAD_CANDIDATES:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise TunError(exc.errno, f"TUNSETOFFLOAD {flags:#x}: {exc.strerror}") from None
            last = exc
    log.warning("TUN offloads unavailable (%s); running with vnet headers but no TSO/GRO", last)
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return 0


def _configure_link(ctl: socket.socket, name: str, mtu: int | None, txqueuelen: int | None) -> tuple[int, int | None]:
    """Set MTU/txqueuelen through ``ctl`` (a socket in the device's namespace); return (mtu, txqueuelen)."""
    if mtu is not None:
        try:
            fcntl.ioctl(ctl.fileno(), SIOCSIFMTU, _ifreq_int(name, mtu))
        except OSError as exc:
            raise TunError(exc.errno, f"TUN {name}: cannot set MTU {mtu}: {exc.strerror}") from None
    txq: int | None = None
    if txqueuelen is not None:
        try:
            fcntl.ioctl(ctl.fileno(), SIOCSIFTXQLEN, _ifreq_int(name, txqueuelen))
            txq = txqueuelen
        except OSError as exc:
            log.warning("TUN %s: cannot set txqueuelen %d: %s", name, txqueuelen, exc)
    if txq is None:
        txq = _get_int(ctl, SIOCGIFTXQLEN, name)
    return _get_int(ctl, SIOCGIFMTU, name), txq


@contextlib.contextmanager
def device_netns(tun_fd: int) -> Iterator[None]:
    """The current thread in the TUN's own namespace (``TUNGETDEVNETNS``) for the block, then back."""
    try:
        ns_fd = int(fcntl.ioctl(tun_fd, TUNGETDEVNETNS))
    except OSError:
        ns_fd = -1  # old kernel / no permission: assume the current namespace
    try:
        with in_netns(ns_fd if ns_fd >= 0 else None):
            yield
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
