"""Operator tools: the `dispatcher` command, the demo stack, and the generated docs."""
