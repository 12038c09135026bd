"""sdqueue's producer side: create and read jobs. Never loads torch or the worker."""

from producer.client import Client

__all__ = ["Client"]
