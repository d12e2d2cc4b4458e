"""The service tests' model repository and server, for the container and monitoring tests."""

from tests.service.conftest import built_models, built_repository, serve, server  # noqa: F401
