"""cffi builder for pyfork._pyfork_cffi (out-of-line API mode).

Run by CMake with the build's own Python: ``python pyfork/_build_ffi.py OUTDIR``
writes OUTDIR/_pyfork_cffi.c; CMake compiles it and links the pyfork_core static
library. The cdef is csrc/pyfork.h itself (it is kept to plain declarations):
preprocessor lines are dropped, except ``#define PF_X value``, which becomes
``#define PF_X ...`` so the compiler supplies the real value.
"""
import os
import re
import sys

import cffi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "pyfork.h")
CONSTANT = re.compile(r"#\s*define\s+(PF_\w+)\s+\S")
COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def cdef_from_header(path):
    with open(path) as f:
        # Comments first: one may start on a #define line and run on.
        text = COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), f.read())
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = CONSTANT.match(line.strip())
            line = "#define %s ..." % m.group(1) if m else ""
        lines.append(line)
    return "\n".join(lines) + "\n"


ffibuilder = cffi.FFI()
ffibuilder.cdef(cdef_from_header(HEADER))
ffibuilder.set_source("pyfork._pyfork_cffi", '#include "pyfork.h"')

if __name__ == "__main__":
    outdir = sys.argv[1] if len(sys.argv) > 1 else "."
    ffibuilder.emit_c_code(os.path.join(outdir, "_pyfork_cffi.c"))
