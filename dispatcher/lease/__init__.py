"""The lease: one work item the fleet holds, from ack to release.

`model` is the record, `machine` the rules of its life (pure), `registry` where it is kept
(Redis, with the Lua scripts beside the methods that run them), `executor` what performs the
machine's effects. Nothing outside this package changes a lease.
"""
