"""What a user's worker log may hold: the worker's own lines, and no library's."""

from __future__ import annotations

import re

OWN_LINE = re.compile(r"(building a tiny model |study |worker |data: |trial \d+|  eval \d+/|again: |platform: |checkpoints go to "
                      r"|preflight |  preflight |\s*$)")


def foreign_lines(log: str) -> list[str]:
    """Lines of the log that sweeper did not write (bitsandbytes, tqdm, transformers, warnings)."""
    return [line for line in log.splitlines() if not OWN_LINE.match(line)]
