"""The fraction of a step's wall time the GPU was busy.

NVML's utilization counter (what ``nvidia-smi`` shows, read through ``torch.cuda.utilization``)
is the percentage of the last sample period during which at least one kernel ran. A background
thread reads it every ``interval`` seconds while a step runs; the mean is the busy fraction.
Without a CUDA device, or without NVML (``pip install nvidia-ml-py``), the meter reports None:
there is no number to log, and none is made up.
"""

from __future__ import annotations

import threading
import warnings

import torch


class BusyMeter:
    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval = torch.device(device), interval
        self.enabled = self.device.type == "cuda" and self._probe()
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _probe(self) -> bool:
        try:
            torch.cuda.utilization(self.device)
            return True
        except Exception as e:  # no NVML: say so once, log None
            warnings.warn(f"GPU-busy fraction not measured: NVML unavailable ({e})", stacklevel=3)
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._samples.append(torch.cuda.utilization(self.device) / 100.0)

    def start(self) -> None:
        if not self.enabled:
            return
        self._samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, name="ossrl-busy", daemon=True)
        self._thread.start()

    def stop(self) -> float | None:
        """The mean busy fraction since ``start``; None where it cannot be measured."""
        if not self.enabled or self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        return sum(self._samples) / len(self._samples) if self._samples else None
