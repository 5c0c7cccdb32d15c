"""How the service says why it refused a request, in an HTTP error body, a gRPC status and the
server log line: at most serve.max_error_chars characters of the message, control characters
escaped. A message quotes what the client sent (a model name, a field name, a path, a content
type, the bytes a parser choked on), and a client controls how long that is and what is in it: a
7 MB gRPC model name made a 7.3 MB log line per call, a newline in a URL path or a multipart
field name forged a log line of its own. Needs the standard library only (the Bento imports it).
"""
from __future__ import annotations

import logging


def bounded(message: str, max_chars: int) -> str:
    """`message` with every character that is not printable (control and format characters, line
    and paragraph separators, zero-width and bidi marks: Python's str.isprintable) escaped as
    Python writes it (\\n, \\x1b, \\u202e), cut after max_chars characters of that, and the number
    of characters left out said at the end."""
    head = message[:max_chars]  # escaping only lengthens: no need to look further
    if head.isprintable():
        shown, used = head, len(head)
    else:
        parts, size, used = [], 0, 0
        for c in head:
            part = c if c.isprintable() else ascii(c)[1:-1]
            if size + len(part) > max_chars:
                break
            parts.append(part)
            size += len(part)
            used += 1
        shown = "".join(parts)
    left = len(message) - used
    return shown if left == 0 else f"{shown}... ({left} more characters)"


class BoundedArgs(logging.Filter):
    """Passes every string argument of a record through `bounded`: for loggers whose lines quote
    what a client sent (BentoML's access log writes each request's path as it came)."""

    def __init__(self, max_chars: int) -> None:
        super().__init__()
        self.max_chars = max_chars

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(bounded(a, self.max_chars) if isinstance(a, str) else a
                                for a in record.args)
        return True
