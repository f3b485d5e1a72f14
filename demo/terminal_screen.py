"""Output that redraws itself on a terminal and stays plain in a pipe or a file."""

from __future__ import annotations

import shutil
from typing import TextIO


class Screen:
    """On a terminal, a block of lines redrawn in place under the lines printed so far;
    elsewhere (a pipe, a file) each block is printed as it comes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self.block: list[str] = []
        self.drawn = 0

    def note(self, text: str) -> None:
        """A permanent line, above the block."""
        self._home()
        self.out.write(text + ("\x1b[K\n" if self.live else "\n"))
        self._draw()

    def show(self, lines: list[str]) -> None:
        if not self.live:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
            return
        self._home()
        self.block = lines
        self._draw()

    def finish(self) -> None:
        """Leave the last block on the screen as plain lines."""
        self.drawn = 0
        self.block = []
        if self.live:
            self.out.write("\x1b[?25h")  # the cursor again
        self.out.flush()

    # Lines are overwritten in place (each then erased to its end) and only what is left below
    # the new block is cleared: clearing the whole screen would make some terminals (tmux)
    # push it into the scrollback, a copy per redraw.

    def _home(self) -> None:
        if self.live and self.drawn:
            self.out.write(f"\r\x1b[{self.drawn}A")  # to the block's first line
        self.drawn = 0

    def _draw(self) -> None:
        if self.live:
            # No line may wrap or scroll away, so that the next redraw finds the block's top.
            size = shutil.get_terminal_size()
            lines = [line[: size.columns - 1] for line in self.block[: max(1, size.lines - 1)]]
            text = "".join(line + "\x1b[K\n" for line in lines) if self.block else ""
            self.out.write("\x1b[?25l" + text + "\x1b[J")
            self.drawn = len(lines) if self.block else 0
        self.out.flush()
