"""A runnable example of celery-sticky: a stateful document pipeline on three workers.

Run it from the repository root with ``python -m example_project``.
"""
