"""CPU seconds of a process tree (this process and every descendant, e.g. a local Ray cluster), from /proc."""

from __future__ import annotations

import os
import threading
import time

import numpy as np


class CpuMeter:
    """CPU seconds used by this process and all its descendants (the local Ray cluster: GCS, raylet, workers),
    sampled from /proc in a thread. Unlike wall time it holds on a machine shared with other work."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.root = interval, os.getpid()
        self.seen: dict[int, float] = {}  # pid -> most CPU seconds seen (a process that exits keeps its last)
        self.samples: list[tuple[float, float]] = []  # (time, CPU seconds of the tree, less this meter's own)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while True:
            procs = {}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                procs[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
            tree, grown = {self.root}, True
            while grown:
                new = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
                tree |= new
                grown = bool(new)
            for pid in tree & procs.keys():
                self.seen[pid] = max(self.seen.get(pid, 0.0), procs[pid][1])
            self.samples.append((time.time(), sum(self.seen.values()) - time.thread_time()))
            if self._stop.wait(self.interval):
                return

    def between(self, start: float, end: float) -> float:
        """CPU seconds used between two times (interpolated between samples)."""
        times, cpu = zip(*self.samples)
        return float(np.interp(end, times, cpu) - np.interp(start, times, cpu))
