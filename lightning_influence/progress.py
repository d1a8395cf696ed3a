"""Progress bars (tqdm) for long estimator, replay and CLI passes.

Every long pass reports ``progress(done, total)``. :func:`resolve_progress` turns the public
``progress=`` argument into such a callable: ``None`` (the default) draws a bar only when stderr
is a terminal, ``True`` always draws one (asked for: also into a log file), ``False`` none, and
any callable is used as given. Under torch.distributed only rank 0 draws: its bar shows its
own share of the work (the ranks' shares are equal) and says so.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Union

Progress = Union[Callable[[int, int], None], bool, None]


def _is_terminal(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process in an initialised torch.distributed group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ProgressBar:
    """A ``progress(done, total)`` callable drawing a tqdm bar (steps, rate, ETA) on ``stream`` (stderr).

    Args:
        label: the bar's description.
        enabled: ``False`` draws nothing.
        force: draw also when ``stream`` is not a terminal (one refreshed line per update interval).
        stream: where to draw (default ``sys.stderr``).
    """

    def __init__(self, label: str, enabled: bool = True, force: bool = False, stream: Any = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and (force or _is_terminal(self.stream))
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        if self._bar is None or self._bar.total != total:
            self.close()
            rank, world = process_rank()
            if rank != 0:  # one bar per query, on rank 0
                self.enabled = False
                return
            from tqdm.auto import tqdm

            label = self.label if world == 1 else f"{self.label} (rank 0 of {world}, its share)"
            self._bar = tqdm(total=total, desc=label, unit="step", file=self.stream, dynamic_ncols=True,
                             mininterval=0.25 if _is_terminal(self.stream) else 10.0, leave=True)
        self._bar.update(max(0, done - self._bar.n))
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def resolve_progress(progress: Progress, label: str) -> Callable[[int, int], None] | None:
    """The ``progress(done, total)`` callable for a public ``progress=`` argument (see the module docstring)."""
    if progress is None or progress is True:
        bar = ProgressBar(label, force=progress is True)
        return bar if bar.enabled else None
    return progress or None
