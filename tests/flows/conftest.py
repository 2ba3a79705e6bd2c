"""Fixtures for the deployment tests: a real Prefect server, on SQLite or PostgreSQL.

``prefect_server`` is parametrized by the server's database, indirectly::

    @pytest.mark.parametrize("prefect_server", ["postgresql"], indirect=True)

"sqlite" (the default, also without the mark) is the database Prefect makes in the
server's temporary ``PREFECT_HOME``; "postgresql" is a throwaway PostgreSQL server
(``postgres_database``). One server per test module.
"""

import os

import pytest
from postgres_server import running, unavailable
from prefect_deployment import QUICK, running_prefect_server

DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="module")
def postgres_database():
    """A PostgreSQL server on 127.0.0.1 from the system's packages, with an empty
    ``prefect`` database; skips where PostgreSQL is not installed."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with running("prefect") as server:
        yield server


@pytest.fixture(scope="module")
def prefect_server(request, tmp_path_factory):
    """``prefect server start`` on a free port; yields the environment pointing at it."""
    database = getattr(request, "param", "sqlite")
    assert database in DATABASES, f"prefect_server: unknown database {database!r}"
    if database == "sqlite" and os.environ.get("PVIT_TESTS_SERVER") and \
            os.environ["PVIT_TESTS_SERVER"] == os.environ.get("PREFECT_API_URL"):
        # the suite's own `prefect server start` on SQLite (tests/conftest.py): no second
        yield {**os.environ, **QUICK}
        return
    url = request.getfixturevalue("postgres_database").url() if database == "postgresql" else None
    with running_prefect_server(tmp_path_factory.mktemp(f"prefect-{database}"), url) as env:
        yield env
