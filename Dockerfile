# One image for every role of the fleet: worker, beat, flower, the emulator and the webhook
# receiver.
# Pinned to an exact release: a floating tag changes the image under a deployed fleet.
FROM python:3.11.14-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY tasks ./tasks
RUN pip install --no-cache-dir . && useradd --create-home dispatcher
USER dispatcher
# Where a session worker keeps each attempt's output (DISPATCHER_SANDBOX_OUTPUT_DIR's default):
# made here so a volume mounted on it starts owned by this user, not root.
RUN mkdir -p /home/dispatcher/.local/state/dispatcher/output
# No DISPATCHER_ON_WORK here: a default would let a fleet pointed at the real service "run"
# real sessions with whatever it names. A worker without one refuses to start, naming it.
CMD ["celery", "-A", "dispatcher", "worker", "-l", "INFO"]
