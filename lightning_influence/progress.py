"""Progress bars (tqdm) for long estimator, replay and CLI passes.

Every long pass reports ``progress(done, total)``. :func:`resolve_progress` turns the public
``progress=`` argument into such a callable: ``None`` (the default) draws a bar only when stderr
is a terminal, ``True`` always draws one (asked for: also into a log file), ``False`` none, and
any callable is used as given.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Union

Progress = Union[Callable[[int, int], None], bool, None]


def _is_terminal(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


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
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=self.label, unit="step", file=self.stream, dynamic_ncols=True,
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
