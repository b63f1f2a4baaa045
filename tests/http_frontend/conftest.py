"""The fake broker and app client every HTTP test module uses (test_app.py defines them), and
the job-record databases the storage tests run on (both dialects, each fresh)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import falcon.testing
import pytest

from http_frontend.app import FrontendConfig, create_app
from http_frontend.database import Database, open_database
from http_frontend.service import ServiceConfig
from tests.http_frontend.test_app import MAX_BODY, RETRY_AFTER, FakeBroker
from tests.http_frontend.test_database import DIALECTS, database_url


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def client(broker: FakeBroker) -> falcon.testing.TestClient:
    config = FrontendConfig(service=ServiceConfig(default_timeout=30.0, retry_after=RETRY_AFTER),
                            max_body=MAX_BODY)
    return falcon.testing.TestClient(create_app(config, broker))


@pytest.fixture(params=DIALECTS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database's URL: SQLite in tmp_path, then a new PostgreSQL database."""
    return database_url(request.param, tmp_path, request)


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    database = open_database(url)
    yield database
    database.close()
