"""A minimal Django project using celery-sticky (docs/django.md), run by tests/test_django.py."""
