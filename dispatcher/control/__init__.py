"""The control plane: short periodic work on the control queue that keeps every lease on time.

`poller` claims work for free slots (`capacity`, `routing`), `heartbeat` keeps leases alive,
`bridge` carries stops both ways, `recovery` moves on attempts whose worker died, and
`healthcheck` answers healthcheck items. Each reads, asks the lease machine, and applies.
"""
