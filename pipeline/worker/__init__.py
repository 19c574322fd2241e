"""The worker side: the exactly-once core that runs inside `celery worker`.

The Celery app and its settings, `@checkpointed`, the execution of one delivery, the lease
keeper, the worker's main-process hooks and the sweep. It may import the store, the settings,
the sender and the shared value objects; never sources and discovery, the command line or
the reference task (import-linter checks this in `make lint`).
"""
