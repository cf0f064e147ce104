"""The training progress bar: in a terminal and in Jupyter, never in pipes and logs.

Values shown are read from the device every READ_EVERY steps only, so the bar does not make a GPU wait for
the host at every step.
"""

from __future__ import annotations

import sys
import time

import torch

READ_EVERY = 20  # steps between reads of the running loss and accuracy


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

    def update(
        self, done: int, taken: range, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int
    ) -> None:
        """After steps `taken` (done in all): refresh when one of them is a multiple of READ_EVERY."""
        if self.bar is None or not (any(s % READ_EVERY == 0 for s in taken) or done == self.total):
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(
            loss=f"{loss_sum.item() / seen:.4f}",
            acc=f"{correct.item() / seen:.4f}",
            img_s=f"{seen * self.world_size / elapsed:,.0f}",
            refresh=False,
        )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
