# One image for every role of the fleet: worker, beat, flower and the emulator.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY tasks ./tasks
RUN pip install --no-cache-dir . && useradd --create-home dispatcher
USER dispatcher
# The sandbox command; replace it (see docs/operations.md) with your own spawn script.
ENV DISPATCHER_ON_WORK="python -m dispatcher.emulator.fake_session"
CMD ["celery", "-A", "dispatcher", "worker", "-l", "INFO"]
