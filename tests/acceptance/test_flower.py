"""Flower on a real fleet: task arguments and results show ids, never a key or a work secret;
a revoke with terminate from Flower stops the work item on the server."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dispatcher.celery.names import CONTROL_TASKS, SESSION_RUN
from tests.support.fleet import AMQP, REDIS, Fleet, on_brokers
from tests.support.isolation import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

SESSION_TASK = SESSION_RUN
KEY_SHAPE = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")


class Flower:
    def __init__(self, fleet: Fleet) -> None:
        self.port = free_port()
        self.auth = ("operator", uuid.uuid4().hex)
        # Flower's options are tornado's: `--port=N`, never `--port N`.
        self.process = fleet.stack.celery(
            "flower", ["flower", f"--port={self.port}", "--address=127.0.0.1"],
            {**fleet.env(), "FLOWER_BASIC_AUTH": ":".join(self.auth)})
        self.fleet = fleet
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", auth=self.auth,
                                 timeout=10)
        wait_for(self._healthy, timeout=30, what="Flower")

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Flower exited:\n{self.fleet.log('flower')[-2000:]}")
        try:
            return self.http.get("/healthcheck").status_code == 200
        except httpx.TransportError:
            return False

    def tasks(self) -> dict[str, dict[str, Any]]:
        response = self.http.get("/api/tasks")
        response.raise_for_status()
        return dict(response.json())

    def info(self, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/api/task/info/{task_id}")
        response.raise_for_status()
        return dict(response.json())

    def sessions(self) -> dict[str, dict[str, Any]]:
        return {tid: t for tid, t in self.tasks().items() if t.get("name") == SESSION_TASK}


@pytest.fixture
def flower(fleet: Fleet) -> Iterator[Flower]:
    fleet.worker("w1", beat=True)
    server = Flower(fleet)
    try:
        yield server
    finally:
        server.http.close()  # the process itself stops with the fleet


@on_brokers(REDIS, AMQP)
def test_flower_shows_ids_only_and_its_revoke_stops_the_work_item(
        fleet: Fleet, flower: Flower) -> None:
    assert flower.http.get("/api/tasks", auth=None).status_code == 401, "the API needs auth"

    long = fleet.create(fake_duration=60)
    fleet.wait_event(long, "started")
    secret = json.loads(fleet.redis.get(f"{fleet.prefix}:work:{long}") or "{}")["secret"]
    assert secret, "the work item and its secret sit in the registry while it runs"
    short = [fleet.create(fake_duration=0.5) for _ in range(3)]
    fleet.wait_stopped(short, timeout=30)

    def succeeded_in_flower() -> dict[str, dict[str, Any]] | None:
        sessions = flower.sessions()
        done = [t for t in sessions.values() if t.get("state") == "SUCCESS"]
        return sessions if len(done) >= len(short) else None

    sessions = wait_for(succeeded_in_flower, timeout=15, what="Flower to see the sessions end")
    forbidden = [fleet.emulator.environment_key, fleet.emulator.api_key, secret]
    every_task = flower.tasks()
    ticks = [t for t in every_task.values() if t.get("name") in CONTROL_TASKS]
    assert not ticks, "the control plane's ticks stay out of Flower's task list"
    for task_id, task in every_task.items():
        _assert_clean(json.dumps(task), forbidden, task_id)
    for task_id in sessions:
        _assert_clean(json.dumps(flower.info(task_id)), forbidden, task_id)

    session_ids = {work_id: fleet.admin.get(work_id).data.id for work_id in [*short, long]}
    for work_id in short:
        task = next(t for t in sessions.values() if f"work_id={work_id}" in t["kwargs"])
        assert f"session_id={session_ids[work_id]}" in task["kwargs"]
        assert task["state"] == "SUCCESS" and work_id in task["result"]

    task_id = fleet.lease(long)["task_id"]
    assert f"work_id={long}" in flower.info(task_id)["kwargs"]
    revoked = flower.http.post(f"/api/task/revoke/{task_id}", params={"terminate": "true"})
    assert revoked.status_code == 200, revoked.text
    wait_for(lambda: fleet.state(long) == "stopped", timeout=15,
             what="the revoked session's work item stopped on the server")
    fleet.wait_event(long, "sigterm", timeout=5)
    wait_for(lambda: fleet.redis.get(f"{fleet.prefix}:work:{long}") is None, timeout=10,
             what="the secret gone from the registry")


def _assert_clean(text: str, forbidden: list[str], task_id: str) -> None:
    for value in forbidden:
        assert value not in text, f"task {task_id} shows a key or a work secret"
    assert not KEY_SHAPE.search(text), f"task {task_id} shows something shaped like a key"
