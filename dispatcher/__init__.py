"""dispatcher: a Celery fleet that acts as one environment worker for self-hosted sandboxes.

`celery -A dispatcher worker` finds the Celery app in `dispatcher.celery`. This module stays
light on purpose: importing it must not import Celery, so the CLI and the emulator start fast.
"""

__version__ = "0.1.0"
