"""Dataset splits of a run (`--split train=0.98,validation=0.02`), stable by the run row's key.

A row's split depends on its key alone: the first 8 bytes of sha256(key) as a fraction of 2**64,
placed on the splits' fractions laid end to end in name order. The same row lands in the same
split in every export, on every machine and whatever the order the option names them in, and
all images of one row (its seeds) land together.
"""

from __future__ import annotations

import hashlib
import math
import re
from bisect import bisect_right
from typing import Mapping

MAX_SPLITS = 8
# What `datasets` accepts as a split name and finds again in `data/{split}-00000-of-00001.parquet`.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


class Splits:
    """Named fractions summing to 1; `of(key)` is the split of a row."""

    def __init__(self, fractions: Mapping[str, float]):
        self.names = sorted(fractions)
        self.fractions = {name: float(fractions[name]) for name in self.names}
        ends, total = [], 0.0
        for name in self.names:
            total += self.fractions[name]
            ends.append(total)
        ends[-1] = 1.0  # the last split takes what float rounding leaves at the top
        self._ends = ends

    def of(self, key: str) -> str:
        point = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
        return self.names[min(bisect_right(self._ends, point), len(self.names) - 1)]

    def __str__(self) -> str:
        # repr: the shortest text that parses back to the same float (the option passed on, over HTTP)
        return ",".join(f"{name}={self.fractions[name]!r}" for name in self.names)


def parse_split(spec: str | Mapping[str, float]) -> Splits:
    """`train=0.98,validation=0.02` (or a mapping) as Splits; ValueError naming what is wrong:
    a name not matching NAME or given twice, a fraction not above 0 or not a number, fractions
    not summing to 1 (within 1e-9), more than MAX_SPLITS splits."""
    if isinstance(spec, str):
        pairs: list[tuple[str, object]] = []
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep:
                raise ValueError(f"{part.strip()[:40]!r} is not NAME=FRACTION (e.g. train=0.98,validation=0.02)")
            pairs.append((name.strip(), value.strip()))
    else:
        pairs = list(spec.items())
    if not pairs or len(pairs) > MAX_SPLITS:
        raise ValueError(f"{len(pairs)} splits: give 1 to {MAX_SPLITS}")
    fractions: dict[str, float] = {}
    for name, value in pairs:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"split name {str(name)[:40]!r}: must be a letter then up to 31 letters, digits or _")
        if name in fractions:
            raise ValueError(f"split {name!r} is given twice")
        try:
            fraction = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"split {name}={str(value)[:40]}: the fraction is not a number") from None
        if not (math.isfinite(fraction) and 0 < fraction <= 1):
            raise ValueError(f"split {name}={value}: the fraction must be above 0 and at most 1")
        fractions[name] = fraction
    total = math.fsum(fractions.values())
    if abs(total - 1) > 1e-9:
        raise ValueError(f"the fractions sum to {total:.12g}: they must sum to 1 (within 1e-9)")
    return Splits(fractions)
