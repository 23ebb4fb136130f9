"""engine/random_pool.py: values from one block at a time, and a forked child never reuses them."""

from __future__ import annotations

import os

from engine.random_pool import RandomPool


def test_values_come_from_one_block_until_it_is_used_up() -> None:
    pool = RandomPool()
    first = [pool.next16() for _ in range(2048)]  # exactly one 4 KB block
    block = pool._block
    assert first[:4] == [(block[i] << 8) | block[i + 1] for i in range(0, 8, 2)]
    pool.next16()
    assert pool._block is not block and pool._offset == 2
    assert 0 <= pool.next32() < 2**32


def test_a_forked_child_draws_fresh_values() -> None:
    pool = RandomPool()
    pool.next16()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what the parent would draw next must not come out here
        os.close(read)
        os.write(write, pool.next32().to_bytes(4, "big"))
        os._exit(0)
    os.close(write)
    child = int.from_bytes(os.read(read, 4), "big")
    os.close(read)
    os.waitpid(pid, 0)
    assert child != pool.next32()
