"""The sdqueue GPU worker: a Celery worker that pins one Stable Diffusion pipeline."""
