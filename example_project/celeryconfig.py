"""Celery settings of the example, taken from the environment.

``python -m example_project`` exports these variables before it imports the app
and starts its workers, so the producer and every worker of one run share one
Redis, one namespace and one state directory, and runs never see each other.
"""

import os
import tempfile

_redis_url = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/12")

#: Every name a run creates in Redis starts with it: queues, leases, step records.
example_run_id = os.environ.get("EXAMPLE_RUN_ID", "example")

broker_url = _redis_url
result_backend = _redis_url
result_expires = 600
broker_connection_retry_on_startup = True
task_default_queue = example_run_id
# The example needs no remote control; without it, workers leave no pidbox bindings.
worker_enable_remote_control = False

# Signs the state handed over between workers; every worker needs the same one.
# A demo value: a deployment takes it from its secret store (STICKY_SECRET).
sticky_secret = os.environ.get("STICKY_SECRET") or "example-project-demo-secret"
sticky_key_prefix = example_run_id
sticky_queue_prefix = example_run_id
sticky_state_dir = os.environ.get(
    "EXAMPLE_STATE_DIR", os.path.join(tempfile.gettempdir(), "celery-sticky-example")
)
