"""Queue names, task names and routing for the fleet.

Queues are split by weight so large layers never block small jobs:

| queue               | tasks                                                        | prefetch |
|---------------------|--------------------------------------------------------------|----------|
| `control`           | convert, convert_manifest, schedule_assemble, push_*, notify | 1        |
| `prepare`           | prepare_layer (heavy: download, decompress, compress)        | 1        |
| `metadata`          | build_metadata (one pass per image, in layer order)          | 1        |
| `assemble`          | assemble_layer whose preparing worker is gone (re-prepares)  | 1        |
| `worker.<nodename>` | assemble_layer (assemble_flat) routed to the worker holding  | 1        |
|                     | the prepared data (the most of it)                           |          |

Every worker also consumes its own `worker.<nodename>` queue (added at start-up, see
workers/startup.py). Task names are stable: services in any language enqueue by name
(argument schema in tasks/README.md).
"""

from __future__ import annotations

from kombu import Queue

CONTROL = "control"
PREPARE = "prepare"
METADATA = "metadata"
ASSEMBLE = "assemble"
SHARED_QUEUES = (CONTROL, PREPARE, METADATA, ASSEMBLE)
WORKER_QUEUE_PREFIX = "worker."

# Stable task names (the public contract for other services).
TASK_CONVERT = "obdconv.convert"
TASK_CONVERT_MANIFEST = "obdconv.convert_manifest"
TASK_PREPARE_LAYER = "obdconv.prepare_layer"
TASK_BUILD_METADATA = "obdconv.build_metadata"
TASK_SCHEDULE_ASSEMBLE = "obdconv.schedule_assemble"
TASK_ASSEMBLE_LAYER = "obdconv.assemble_layer"
TASK_ASSEMBLE_FLAT = "obdconv.assemble_flat"
TASK_PUSH_MANIFEST = "obdconv.push_manifest"
TASK_PUSH_INDEX = "obdconv.push_index"
TASK_FINISH = "obdconv.finish"
TASK_NOTIFY = "obdconv.notify"  # completion callback POST (tasks/notify.py)

TASK_ROUTES: dict[str, dict[str, str]] = {
    TASK_CONVERT: {"queue": CONTROL},
    TASK_CONVERT_MANIFEST: {"queue": CONTROL},
    TASK_PREPARE_LAYER: {"queue": PREPARE},
    TASK_BUILD_METADATA: {"queue": METADATA},
    TASK_SCHEDULE_ASSEMBLE: {"queue": CONTROL},
    TASK_ASSEMBLE_LAYER: {"queue": ASSEMBLE},  # overridden per call with the holder's own queue
    TASK_ASSEMBLE_FLAT: {"queue": ASSEMBLE},  # likewise
    TASK_PUSH_MANIFEST: {"queue": CONTROL},
    TASK_PUSH_INDEX: {"queue": CONTROL},
    TASK_FINISH: {"queue": CONTROL},
    TASK_NOTIFY: {"queue": CONTROL},
}


def worker_queue(nodename: str) -> str:
    """The private queue of one worker, e.g. `worker.w1@host`."""
    return WORKER_QUEUE_PREFIX + nodename


def owner_of_worker_queue(queue: str) -> str | None:
    return queue[len(WORKER_QUEUE_PREFIX):] if queue.startswith(WORKER_QUEUE_PREFIX) else None


def shared_queues() -> list[Queue]:
    return [Queue(name, routing_key=name) for name in SHARED_QUEUES]
