"""sdqueue's producer side: create and read jobs. Never loads torch or the worker.

`Client` works on the database, the broker and storage directly; `producer.http.Client` on the
HTTP API. Each is imported when first named: `sdqueue status` through the API, or `--help`,
loads no SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from producer.client import Client

        return Client
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
