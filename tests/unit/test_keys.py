"""Every Redis key the fleet writes is under its `DISPATCHER_KEY_PREFIX`, wherever the key is
defined: fleets (and the emulator) share one Redis only as long as that holds."""

from __future__ import annotations

import inspect
from typing import Any

from redis import Redis
from standardwebhooks import Webhook

from dispatcher.celery.keys import CeleryKeys
from dispatcher.control.capacity import Capacity
from dispatcher.control.poll_keys import PollKeys
from dispatcher.lease.keys import Keys
from dispatcher.metrics import Metrics
from dispatcher.ops.webhook_server import Receiver

PREFIX = "fleet-a"


def _every_key(holder: Any) -> list[str]:
    """Each key a key class names: its properties, and its methods called with an id."""
    keys = []
    for name, member in inspect.getmembers(type(holder)):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            keys.append(getattr(holder, name))
        elif inspect.isfunction(member):
            keys.append(getattr(holder, name)("some-id"))
    return keys


def test_every_key_class_keeps_its_keys_under_the_prefix() -> None:
    for holder in (Keys(PREFIX), PollKeys(PREFIX), CeleryKeys(PREFIX)):
        keys = _every_key(holder)
        assert keys, f"{type(holder).__name__} names no key"
        outside = [k for k in keys if not k.startswith(f"{PREFIX}:")]
        assert not outside, f"{type(holder).__name__}: keys outside the prefix: {outside}"


def test_the_keys_kept_beside_their_owners_are_under_the_prefix() -> None:
    redis = Redis()  # never connected: only the key names are read
    receiver = Receiver(webhook=Webhook("whsec_" + "A" * 32), redis=redis, prefix=PREFIX,
                        publish=lambda: None)
    for key in (Metrics(redis, prefix=PREFIX).key, Capacity(redis, prefix=PREFIX).workers_key,
                receiver._seen_key("msg_1")):
        assert key.startswith(f"{PREFIX}:"), key
