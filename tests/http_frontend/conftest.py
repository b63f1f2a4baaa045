"""The fake broker and app client every HTTP test module uses (test_app.py defines them)."""

from __future__ import annotations

import falcon.testing
import pytest

from http_frontend.app import FrontendConfig, create_app
from http_frontend.service import ServiceConfig
from tests.http_frontend.test_app import MAX_BODY, RETRY_AFTER, FakeBroker


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def client(broker: FakeBroker) -> falcon.testing.TestClient:
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0, retry_after=RETRY_AFTER),
                            max_body=MAX_BODY)
    return falcon.testing.TestClient(create_app(config, broker))
