"""Paddle's chatter a user of train.py need not read, kept out of the output.

Warnings are filtered by message (each names what it silences, nothing broader), glog's
INFO lines are off unless GLOG_minloglevel is set, and Fleet's start-up report and
FLAGS banner are dropped. `before_paddle_import` must run before `import paddle`: the ccache
warning and glog's settings take effect at import.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings

# Messages of warnings Paddle repeats without a user action that could answer them.
NOISY_WARNINGS = (
    "No ccache found",  # at every import: only extension builds need ccache
    "When training, we now always track global mean and variance",  # every BN forward
    r"Current global rank \d+ is not in group",  # fleet.init's groups of one rank
)
# The banner paddle.distributed.init_parallel_env writes to stderr, first and last line.
FLAGS_BANNER = ("=" * 23 + " Modified FLAGS detected ", "=" * 71)


def before_paddle_import() -> None:
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("GLOG_minloglevel", "1")  # glog: WARNING and above


def without_flags_banner(text: str) -> str:
    """`text` without the modified-FLAGS banner block."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(FLAGS_BANNER[0]):
            inside = True
        elif inside and line.rstrip("\n") == FLAGS_BANNER[1]:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


@contextlib.contextmanager
def fleet_start():
    """Around fleet.init (called with log_level="WARNING", which drops its INFO report):
    the FLAGS banner is dropped; anything else it writes to stderr still reaches stderr."""
    from paddle.distributed.fleet.utils.log_util import set_log_level
    set_log_level("WARNING")  # DistributedStrategy() reports itself before fleet.init
    caught = io.StringIO()
    try:
        with contextlib.redirect_stderr(caught):
            yield
    finally:
        sys.stderr.write(without_flags_banner(caught.getvalue()))
