"""The session plane: one long task per session attempt on the session queues.

`attempt` supervises one attempt of one session; `sandbox` starts and signals its process
group; `launcher` leads that group and kills it when the worker dies.
"""
