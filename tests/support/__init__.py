"""Everything the tests share, each written once, imported by its full name
(`from tests.support.fleet import Fleet`; never by a bare module name or a `sys.path` edit).

    isolation   what keeps parallel (pytest-xdist) workers apart: each worker's Redis databases
                (`fleet_db`, `integration_db`, `EMULATOR_DB`, `redis_url`), `REDIS_BASE`
                ($DISPATCHER_TEST_REDIS) and `free_port` from a port range of its own
    waiting     `wait_for(predicate, timeout=..., what=...)`: wait on an event, never a sleep
    bounds      time bounds the tests hold the fleet to (`STATUS_CHECK_SECONDS`), with reasons
    emulator    `EmulatorProcess`, `API_HEADERS`, `under_both_models`, the fixtures `emulator`,
                `emulator_factory`, `server_model`
    rabbitmq    `rabbitmqctl` and the fixture `rabbitmq_vhost` (a vhost of the test's own)
    inprocess   `in_process_runtime`, `close_runtime`, `SentTasks`, `poll_until`: a runtime in
                the test's process on real Redis and the emulator
    fleet       `Fleet` (real `celery` worker/beat processes), `flush_fleet_db`, `on_brokers`,
                `REDIS`/`AMQP`, `CELERY`, `assert_no_overlap`
    engine      `ensure_engine`, `ensure_image`: the Docker engine and the test sandbox image
                (built from `sandbox_image/`)
    chaos       `ChaosFleet`, `Figures`, `RedisServer`, `Watcher`: a fleet under fault injection
    invariants  the promises every chaos scenario is checked against
    dying_consumer  `take_and_die`: a worker killed holding a session message it took off its
                Redis queue, before it announced it
    sentinel    `SentinelServer`: a `redis-sentinel` of the test's own
    hosts       `Network`, `Host`, `Link`: fleet members as hosts in network namespaces, links
                cut, lossy or slow (the partition scenarios)
    report      renders the chaos figures: `python tests/support/report.py FILE`
    official_runner  the official runner's tests: a scripted agent's `SCRIPT` and `check_results`,
                `scripted_session`, `tool_results`, and `ON_WORK`, the SDK's on-work recipe

The fixtures of `emulator` and `rabbitmq` are plugins of tests/conftest.py, so every tier has
them; the fixtures of one tier stay in its conftest.py.

Where the helpers lived before (an old bare import becomes the line on the right):

    from fleet import X, wait_for      from tests.support.fleet import X
                                       from tests.support.waiting import wait_for
    from fleet import FLEET_REDIS_DB   flush_fleet_db() / fleet_db() (tests.support.fleet,
                                       tests.support.isolation)
    from engine import ...             from tests.support.engine import ...
    from inprocess import ...          from tests.support.inprocess import ...
        (REDIS_BASE + "/10")           redis_url(integration_db())  (tests.support.isolation)
    from chaos_fleet import ...        from tests.support.chaos import ...
    import invariants                  from tests.support import invariants
    from invariants import X           from tests.support.invariants import X
    dispatcher.ops.stack.free_port     from tests.support.isolation import free_port
    "redis://127.0.0.1:6379/N"         redis_url(integration_db()) or redis_url(fleet_db())
"""
