"""The service tests' real uvicorn server over a small model repository, for the benchmark tests."""

from tests.service.conftest import built_models, built_repository, serve, server  # noqa: F401
