#!/bin/sh
# The test sandbox of the docker runtime, busybox only (the test image holds nothing else).
# It reads the work item JSON on stdin, behaves as the item's metadata says (fake.duration,
# fake.exit_code, fake.ignore_sigterm, as the fake session program does), and appends JSON lines
# to /records/<work_id>.jsonl, a bind mount of the test's records directory. The secret is only
# ever recorded as a hash.
work=$(cat)
rec="/records/$ANTHROPIC_WORK_ID.jsonl"
meta() { echo "$work" | sed -n "s/.*\"fake\.$1\":\"\([^\"]*\)\".*/\1/p"; }
duration=$(meta duration)
exit_code=$(meta exit_code)
ignore=$(meta ignore_sigterm)
hash() { sha256sum | cut -d' ' -f1; }
stdin_secret=$(echo "$work" | sed -n 's/.*"secret":"\([^"]*\)".*/\1/p' | tr -d '\n' | hash)
file_secret=""
if [ -n "$ANTHROPIC_WORK_SECRET_FILE" ]; then
  file_secret=$(tr -d '\n' < "$ANTHROPIC_WORK_SECRET_FILE" | hash)
  file_mode=$(stat -c %a "$ANTHROPIC_WORK_SECRET_FILE")
fi
say() { printf '{"event":"%s","host":"%s","attempt":"%s"%s}\n' "$1" "$(hostname)" \
  "$DISPATCHER_ATTEMPT" "$2" >> "$rec"; }
say started ",\"session_id\":\"$ANTHROPIC_SESSION_ID\",\"environment_id\":\"$ANTHROPIC_ENVIRONMENT_ID\",\
\"stdin_work_id\":\"$(echo "$work" | sed -n 's/^{"id":"\([^"]*\)".*/\1/p')\",\
\"stdin_secret_sha256\":\"$stdin_secret\",\"file_secret_sha256\":\"$file_secret\",\
\"file_mode\":\"$file_mode\",\"env_names\":\"$(env | cut -d= -f1 | sort | tr '\n' ' ')\""
on_term() {
  say sigterm ""
  [ "$ignore" = 1 ] && return
  say exited ',"reason":"sigterm"'
  exit 0
}
trap on_term TERM
sleep "${duration:-1}" &
child=$!
while :; do  # `wait` returns early when a trap ran: wait again while the sleep lives
  wait "$child"
  kill -0 "$child" 2>/dev/null || break
done
say exited ",\"reason\":\"completed\""
exit "${exit_code:-0}"
