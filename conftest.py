"""Repository-wide pytest configuration.

Its presence at the repository root makes pytest (default ``prepend`` import mode) put the root
on ``sys.path``, so tests import the packages and ``tests.openapi_spec`` without installing.
"""
