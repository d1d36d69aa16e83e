"""Imports every domain's `tasks` module so their roles are registered in `runner.ROLES`.

Both `tunegate serve` (through app.main) and `tunegate worker` import this module.
"""

from app.evals import tasks as evals_tasks
from app.files import tasks as files_tasks
from app.jobs import syncer as jobs_syncer
from app.jobs import tasks as jobs_tasks
from app.providers.local import trainer as local_trainer
from app.validation import tasks as validation_tasks
from app.webhooks import dispatcher as webhooks_dispatcher

__all__ = [
    "evals_tasks",
    "files_tasks",
    "jobs_syncer",
    "jobs_tasks",
    "local_trainer",
    "validation_tasks",
    "webhooks_dispatcher",
]
