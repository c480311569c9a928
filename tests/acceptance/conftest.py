"""Fixtures of the acceptance tests (the fleet itself lives in tests/support/fleet.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.support.engine import ensure_engine, ensure_image
from tests.support.fleet import AMQP, REDIS, Fleet, flush_fleet_db


@pytest.fixture
def fleet(request: pytest.FixtureRequest, emulator: Any, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet on Redis; on RabbitMQ (a vhost of its own, Redis still the registry) for a test
    parametrized with `on_brokers`."""
    flush_fleet_db()
    f = Fleet(emulator, tmp_path)
    if getattr(request, "param", REDIS) == AMQP:
        f.overrides["DISPATCHER_BROKER_URL"] = request.getfixturevalue("rabbitmq_vhost")()
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture(scope="session")
def sandbox_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test image on a real engine (started here when none answers)."""
    return ensure_image(ensure_engine(), tmp_path_factory.mktemp("image"))


@pytest.fixture
def engine() -> Iterator[docker.APIClient]:
    client = ensure_engine()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def container_fleet(fleet: Fleet, sandbox_image: str, engine: docker.APIClient) -> Iterator[Fleet]:
    """A fleet of the docker runtime; at the end no container of it may be left."""
    fleet.use_containers(sandbox_image)
    yield fleet
    try:
        fleet.stop_all()
    finally:
        leftover = fleet.containers(engine)
        for container in leftover:
            engine.remove_container(container["Id"], force=True, v=True)
    assert not leftover, "containers of the fleet outlived it"
