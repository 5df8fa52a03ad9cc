"""One-line messages: what every error this project prints is reduced to."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Set by ``python -m megatron_lite.launch`` for its ranks: it prints their one-line error itself.
LAUNCHER_PRINTS_ERRORS = "MEGATRON_LITE_LAUNCHER_PRINTS_ERRORS"


def record_for_launcher(line: str) -> bool:
    """Write ``line`` to torchelastic's error file for this rank (``TORCHELASTIC_ERROR_FILE``, set by
    torchrun), in the layout torchelastic's own error handler writes, so that torchrun's failure
    summary and ``megatron_lite.launch`` show it; returns whether the launcher will print it (the
    caller then need not)."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    try:
        with open(path, "w") as out:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, out)
    except OSError:
        return False
    return os.environ.get(LAUNCHER_PRINTS_ERRORS) == "1"
