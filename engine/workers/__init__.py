"""Workers: one engine over N processes, each serving one queue of a multi-queue TUN (docs/control.md)."""
