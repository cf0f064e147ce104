"""The training progress bar (in a terminal and in Jupyter, never in pipes and logs), and `Watch`, which
reads an epoch's running loss and accuracy from the device without making it wait.
"""

from __future__ import annotations

import sys
import time

import torch

READ_EVERY = 20  # steps between reads of the running loss and accuracy


class Watch:
    """An epoch's running (loss sum, correct) as the host last saw them.

    On a GPU, `poll` starts a copy into pinned host memory and returns at once; the values are those of the
    latest copy that has arrived, so the step loop never waits for the device. On the CPU they are read
    directly (there is nothing to wait for).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.loss_sum: float | None = None
        self.correct, self.seen = 0.0, 0
        if self.cuda:
            self._host = torch.zeros(2, dtype=torch.float64, pin_memory=True)
            self._event, self._pending_seen = torch.cuda.Event(), None

    def poll(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        if not self.cuda:
            self.loss_sum, self.correct, self.seen = loss_sum.item(), float(correct.item()), seen
            return
        if self._pending_seen is not None:
            if not self._event.query():
                return  # the last copy is still on its way: keep the values we have
            (self.loss_sum, self.correct), self.seen = self._host.tolist(), self._pending_seen
        self._host.copy_(torch.stack([loss_sum.double(), correct.double()]), non_blocking=True)
        self._event.record()
        self._pending_seen = seen


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its stderr is no terminal, yet a person is watching)."""
    shell = sys.modules.get("IPython")
    ipython = getattr(shell, "get_ipython", lambda: None)() if shell else None
    return type(ipython).__name__ == "ZMQInteractiveShell"


def _tqdm():
    """tqdm's widget in a notebook where ipywidgets is installed; else its text bar (which a notebook shows
    in place as well)."""
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm


class Progress:
    """One epoch's bar (tqdm): steps done, running loss and accuracy, images/s. Does nothing when off."""

    def __init__(self, total: int, desc: str, enabled: bool, world_size: int = 1):
        self.total, self.world_size, self.started = total, world_size, time.perf_counter()
        self.bar = None
        if enabled and (sys.stderr.isatty() or in_notebook()):
            self.bar = _tqdm()(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, done: int, watch: Watch) -> None:
        """Steps done so far, and the running values as the watch last saw them."""
        if self.bar is None:
            return
        if watch.loss_sum is not None and watch.seen:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(
                loss=f"{watch.loss_sum / watch.seen:.4f}",
                acc=f"{watch.correct / watch.seen:.4f}",
                img_s=f"{watch.seen * self.world_size / elapsed:,.0f}",
                refresh=False,
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
