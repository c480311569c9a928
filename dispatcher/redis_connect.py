"""Where the fleet's Redis is: one master at `DISPATCHER_REDIS_URL`, or whichever master the
Sentinels name, and the client settings of every part that talks to it.

With Sentinels, every client asks them for the master when it connects, and connects again
when the master goes away or turns replica (redis-py's `SentinelManagedConnection`); so after a
failover the registry, the broker, the result backend and beat all follow the new master. Four
libraries build these clients, each with its own spelling of Sentinel, so the settings are a
list of Sentinels and a master name (not one URL form) and this module writes each spelling:

* the registry, `status --check` and the webhook receiver: redis-py's `Sentinel.master_for`;
* Celery's broker: kombu's `sentinel://` transport, `master_name` in the transport options;
* Celery's result backend: its `sentinel://` backend, `master_name` in its transport options;
* beat: celery-redbeat's `redis-sentinel://` URL, with `sentinels` in `redbeat_redis_options`.

Passwords stay out of what `celery inspect conf` and Flower show unmasked. Celery masks the
broker URL and the first address of a `;`-separated result backend URL (kombu's
`sanitize_url` parses only that one); kombu and the backend take the master's credentials from
the first address alone, so only the first carries them. Option mappings are masked by key.

These are decisions over settings only; the one effect is `connect`, which builds a client.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from redis import Redis
from redis.connection import parse_url
from redis.sentinel import Sentinel

from dispatcher.settings import Settings, sentinel_address, split_redis_credentials

__all__ = ["SENTINEL_TIMEOUT_SECONDS", "beat_conf", "broker_redis_url", "connect", "is_redis",
           "result_backend_conf", "sentinel_options"]

# A Sentinel answers a master look-up from memory; one that does not answer within this is
# skipped for the next, so a dead Sentinel host delays a reconnect by this much at most.
SENTINEL_TIMEOUT_SECONDS = 2.0
# Connections one client's pool may open (redis-py 8 caps a pool at 100 and raises
# `MaxConnectionsError` past it, failing the command). A pool opens a connection only when that
# many commands are in flight at once: a session worker runs a thread per slot, and at 500 slots
# the 101st concurrent read failed a session's start and the worker's slot advertisement (the
# fleet then claimed nothing more). Threads of the process bound it in practice; this bound is
# Redis's own default client limit (`maxclients`), so the pool is never what refuses.
REDIS_MAX_CONNECTIONS = 10_000


def connect(settings: Settings, *, timeout: float, url: str | None = None) -> Redis:
    """A client of the fleet's Redis master (through the Sentinels when they are set), with
    `timeout` on connects and replies. `url` (an operator's `--redis-url`) overrides both."""
    options: dict[str, Any] = {"decode_responses": True, "socket_timeout": timeout,
                               "socket_connect_timeout": timeout,
                               "max_connections": REDIS_MAX_CONNECTIONS}
    if url is not None or not settings.redis_sentinels:
        return Redis.from_url(url or settings.redis_url, **options)
    sentinel = Sentinel([sentinel_address(a) for a in settings.redis_sentinels],  # type: ignore[no-untyped-call]
                        sentinel_kwargs=sentinel_options(settings))
    master: Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        _master(settings), redis_class=Redis, **_master_credentials(settings), **options)
    return master


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """How a client talks to the Sentinels themselves (not to the master)."""
    options: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_SECONDS,
                               "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS}
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    return options


def is_redis(url: str) -> bool:
    """Whether a broker URL names Redis (kombu's schemes for it), not RabbitMQ."""
    return urlsplit(url).scheme in ("redis", "rediss", "redis+socket")


def broker_redis_url(settings: Settings) -> str:
    """Kombu's URL of the fleet's Redis: the URL itself, or one `sentinel://` per Sentinel."""
    return _sentinel_urls(settings) if settings.redis_sentinels else settings.redis_url


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """What kombu's Sentinel transport needs besides the URL (nothing without Sentinels)."""
    if not settings.redis_sentinels:
        return {}
    return {"master_name": _master(settings), "sentinel_kwargs": sentinel_options(settings)}


def result_backend_conf(settings: Settings, *, key_prefix: str) -> dict[str, Any]:
    """Celery's result backend settings: results live on the fleet's Redis, under the prefix."""
    return {"result_backend": broker_redis_url(settings),
            "result_backend_transport_options": {"global_keyprefix": key_prefix,
                                                 **broker_transport_options(settings)}}


def beat_conf(settings: Settings) -> dict[str, Any]:
    """celery-redbeat's URL and client options; no password in the URL (`split_redis_credentials`
    says why)."""
    url, options = split_redis_credentials(settings.redis_url)
    if not settings.redis_sentinels:
        return {"redbeat_redis_url": url, "redbeat_redis_options": options}
    return {"redbeat_redis_url": "redis-sentinel://",
            "redbeat_redis_options": {
                **options,
                "sentinels": [sentinel_address(a) for a in settings.redis_sentinels],
                "service_name": _master(settings),
                "db": _master_credentials(settings).get("db", 0),
                "sentinel_kwargs": sentinel_options(settings)}}


def _master(settings: Settings) -> str:
    # Settings refuse Sentinels without a master name; this only narrows the type.
    assert settings.redis_sentinel_master is not None
    return settings.redis_sentinel_master


def _master_credentials(settings: Settings) -> dict[str, Any]:
    """What the URL says of the master besides where it is: user, password, database."""
    parts: dict[str, Any] = parse_url(settings.redis_url)  # type: ignore[no-untyped-call]
    return {k: parts[k] for k in ("username", "password", "db") if parts.get(k) is not None}


def _sentinel_urls(settings: Settings) -> str:
    """`sentinel://[user:pass@]host:port/db;sentinel://host:port/db...`: credentials on the
    first address only (see the module's docstring)."""
    master = _master_credentials(settings)
    db = master.get("db", 0)
    auth = ""
    if "password" in master or "username" in master:
        auth = (quote(master.get("username", ""), safe="") + ":"
                + quote(master.get("password", ""), safe="") + "@")
    urls = []
    for i, address in enumerate(settings.redis_sentinels):
        host, port = sentinel_address(address)
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        urls.append(f"sentinel://{auth if i == 0 else ''}{netloc}/{db}")
    return ";".join(urls)
