"""The reference Work API server (`dispatcher emulator`), with the session side the official
runner reads, and the fake session program.

This package `__init__` imports nothing on purpose: `python -m dispatcher.emulator.fake_session`
runs as every sandbox of a test fleet and must start in milliseconds, and the `dispatcher` CLI
imports `dispatcher.emulator.cli` to register its options without loading the server.

Modules, one concept each:

- `config`: the emulator's settings and its defaults, with the reasons for them
- `keys`: every Redis key it writes, under one prefix
- `clock`: RFC 3339 timestamps (microseconds, so successive lease tokens differ)
- `errors`: the Anthropic error shape and the exceptions that produce it
- `auth`: which credential each endpoint takes
- `endpoints`: naming a Work API request from its method and path (for faults and the log)
- `lifecycle`: the work item state machine, pure (no Redis)
- `agent`: the scripted agent, how a session's event log grows, pure
- `sessions`: sessions, their event logs and live streams on Redis
- `session_routes`: the session routes the official runner uses; what is not served
- `metadata`: metadata merge (`null` deletes) and its limits
- `records`: the stored work item and its public JSON
- `store`: the Redis model (streams, consumer groups, hashes, sorted sets)
- `faults`: fault switches and the ASGI middleware that applies them
- `requestlog`: the capped request log for invariant checks
- `app`: the FastAPI routes; `admin`: the `/_emulator/*` routes; `context`: what routes share
- `server`: uvicorn on 127.0.0.1 until SIGTERM or Ctrl-C; `cli`: `dispatcher emulator`
- `fake_session`: the stdlib-only on-work program that records what it was given
"""
