"""RabbitMQ vhosts of a test's own, as a fleet gets in production (its queues, exchanges and
pidbox broadcasts are nobody else's), so tests on RabbitMQ run side by side in any worker."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

__all__ = ["RABBITMQ_HOST_PORT", "rabbitmq_vhost", "rabbitmqctl"]

# The machine's RabbitMQ (`./dev test` starts it), as CI finds it: guest/guest on 127.0.0.1.
RABBITMQ_HOST_PORT = os.environ.get("DISPATCHER_TEST_RABBITMQ", "127.0.0.1:5672")


def rabbitmqctl(*args: str) -> None:
    """One `rabbitmqctl` call (about half a second: it starts an Erlang node)."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"rabbitmqctl {args[0]}: {done.stderr or done.stdout}"


@pytest.fixture
def rabbitmq_vhost() -> Iterator[Callable[..., str]]:
    """Make a vhost of the test's own, as a fleet gets in production (its queues, exchanges and
    pidbox broadcasts are nobody else's): `rabbitmq_vhost()` returns its AMQP URL;
    `rabbitmq_vhost(user, password)` adds that user for it. Deleted, with all they hold, after."""
    made: list[tuple[str, str]] = []

    def make(user: str = "guest", password: str = "guest") -> str:
        vhost = f"test-{uuid.uuid4().hex[:10]}"
        rabbitmqctl("add_vhost", vhost)
        made.append((vhost, user))
        if user != "guest":
            rabbitmqctl("add_user", user, password)
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        return f"amqp://{user}:{password}@{RABBITMQ_HOST_PORT}/{vhost}"

    try:
        yield make
    finally:
        for vhost, user in made:
            rabbitmqctl("delete_vhost", vhost)
            if user != "guest":
                rabbitmqctl("delete_user", user)
