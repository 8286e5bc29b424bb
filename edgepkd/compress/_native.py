"""Silence native libraries (TFLite converter, XNNPACK) that write to the process's stdout/stderr directly."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def quiet_native():
    """Redirect file descriptors 1 and 2 to a temporary file; replay what was captured if an error escapes."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace")[-4000:])
