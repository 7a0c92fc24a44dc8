"""The worker-side writers of one scoreboard line, pure backend (csrc/slot.c).

Theory of operation: pyfork.scoreboard's SlotView already writes a line's
fields in Python, for either backend; the pure SlotWriter is the SlotView of
a single line, built over the SLOT_SIZE bytes a caller hands in (SlotView.line), so
request_started(), request_finished(), conn_closed(n), conn_taken(n),
conn_accepted(n) and set_capacity(n) behave field by field as the C writers do.
"""

from pyfork.scoreboard import Scoreboard, SlotView


class SlotWriter(SlotView):
    """The worker-side writers of one scoreboard line (mirrors _core.SlotWriter):
    a SlotView of the single line ``line`` (SlotView.line)."""

    def __init__(self, line):
        super().__init__(Scoreboard(line, 1), 0)
