"""Celery app, worker start-up, queues and routing. `celery -A workers worker` finds `app` here."""

from workers.app import app

__all__ = ["app"]
