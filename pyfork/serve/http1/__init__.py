"""HTTP/1.1 for the WSGI interface: parsing requests and rendering responses.

  head.py      one request head: llhttp (httptools) callbacks, target and framing checks
  reader.py    RequestReader: cuts heads and bodies (length, chunked) out of a byte stream
  response.py  response heads, chunk framing, canned error responses

Every public name is importable from ``pyfork.serve.http1``.
"""

from .head import HttpError, Request, decode_path, split_target
from .reader import COMPLETE, HEAD, NEED_DATA, Limits, RequestReader
from .response import (
    CONTINUE_100, MODE_CHUNKED, MODE_CLOSE, MODE_LENGTH, MODE_NONE, SERVER_LINE, chunk, date_line,
    error_response, render_head,
)

__all__ = [
    "Limits", "HttpError", "Request", "RequestReader", "NEED_DATA", "HEAD", "COMPLETE",
    "split_target", "decode_path", "render_head", "error_response", "chunk", "date_line",
    "CONTINUE_100", "SERVER_LINE", "MODE_NONE", "MODE_LENGTH", "MODE_CHUNKED", "MODE_CLOSE",
]
