"""A slow file system for the preemption checkpoint, in tests only (tests/test_stop.py
puts this folder on PYTHONPATH): with SLOW_SAVE_S set, the write of a .pdckpt file made
after a stop signal (ppdpn.requeue then ignores SIGUSR1) writes half its bytes, waits
SLOW_SAVE_S seconds, then writes the rest, as a large checkpoint on a network file system
would take that long. Other checkpoints are written as usual, to keep the tests short."""
import importlib.abc
import importlib.machinery
import os
import sys
import time

DELAY = float(os.environ.get("SLOW_SAVE_S") or 0)


def _slow_write(path, data: bytes) -> None:
    from pathlib import Path
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data[:len(data) // 2])
        f.flush()
        time.sleep(DELAY)
        f.write(data[len(data) // 2:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _SlowCheckpoints(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "ppdpn.checkpoint":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            write = module.atomic_write_bytes

            def atomic_write_bytes(p, data):
                import signal
                stopping = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
                slow = str(p).endswith(".pdckpt") and stopping
                return (_slow_write if slow else write)(p, data)
            module.atomic_write_bytes = atomic_write_bytes
        spec.loader.exec_module = exec_module
        return spec


if DELAY:
    sys.meta_path.insert(0, _SlowCheckpoints())
