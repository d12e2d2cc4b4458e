"""The service tests' model repository, for the container tests."""

from tests.service.conftest import built_models, built_repository  # noqa: F401
