"""SIGINT/SIGTERM during training: finish the current optimizer step, checkpoint, exit 130/143.

A second Ctrl-C stops at once (Python's default KeyboardInterrupt), for when saving is not wanted."""

from __future__ import annotations

import signal
from types import FrameType

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequests:
    """Context manager that turns the first SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self, on_request=None):
        self.received: signal.Signals | None = None
        self.on_request = on_request  # called once with the signal, to tell the user what happens next
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(number)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C aborts
        if self.on_request:
            self.on_request(self.received)

    def __enter__(self) -> StopRequests:
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.received]
