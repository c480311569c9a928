"""The fixtures every tier may use, defined in tests/support (see its `__init__` for the map):
the emulator (`emulator`, `emulator_factory`) and RabbitMQ vhosts (`rabbitmq_vhost`)."""

from __future__ import annotations

pytest_plugins = ["tests.support.emulator", "tests.support.rabbitmq"]
