"""Serve many tasks from one frozen backbone: mixed-task batches, dynamic batching, an HTTP server.

- ``ServingEngine``: attach merged task folders, one forward pass for rows of different tasks.
- ``serving.batcher.DynamicBatcher``: gathers concurrent requests into mixed batches (asyncio).
- ``serving.server.create_app``: the FastAPI application (``adamix-zoo serve`` runs it with
  uvicorn); imported from its module so that the engine alone never needs FastAPI.
"""

from adamix_zoo.serving.codec import Prediction
from adamix_zoo.serving.engine import ServingEngine
from adamix_zoo.serving.errors import InputError, UnknownTaskError
from adamix_zoo.serving.residency import TaskInfo
from adamix_zoo.serving.task_folders import TaskAdapter, read_task_adapter

__all__ = [
    "InputError",
    "Prediction",
    "ServingEngine",
    "TaskAdapter",
    "TaskInfo",
    "UnknownTaskError",
    "read_task_adapter",
]
