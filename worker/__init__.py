"""The sdqueue GPU worker: a Celery worker that pins one Stable Diffusion pipeline."""

import os

# Set before transformers is first imported: its notices (e.g. the torchvision fallback) are noise in a worker.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
