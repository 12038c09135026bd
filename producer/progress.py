"""`sdqueue wait --progress`: a job's denoising steps as a bar on stderr, from its events (local or
through the API alike)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from models.text import inert


@contextmanager
def progress_bar() -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yields the `on_event` callback of a wait: the steps of the attempt in hand (a retry starts
    again at 1), the job's state as the label. The bar is closed when the block ends."""
    from tqdm import tqdm

    bar = tqdm(desc="waiting", unit="step", file=sys.stderr, dynamic_ncols=True)

    def show(event: dict[str, Any]) -> None:
        if event.get("type") == "progress":
            step, steps = event["step"], event["steps"]
            if steps != bar.total or step < bar.n:
                bar.reset(total=steps)
            bar.set_description_str("running", refresh=False)
            bar.update(step - bar.n)
        elif event.get("type") == "state":
            bar.set_description_str(inert(str(event["state"])))

    try:
        yield show
    finally:
        bar.close()
