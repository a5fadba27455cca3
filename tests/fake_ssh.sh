#!/usr/bin/env bash
# ssh for the sharded tests: runs the remote command on this machine, as ssh would on the host.
# Hosts named in FAKE_SSH_DOWN (comma-separated) cannot be reached, as ssh reports it (exit 255).
while [[ "${1:-}" == -* ]]; do
  case "$1" in -o) shift 2 ;; *) shift ;; esac
done
host="$1"; shift
if [[ ",${FAKE_SSH_DOWN:-}," == *",$host,"* ]]; then
  echo "ssh: connect to host $host port 22: Connection refused" >&2
  exit 255
fi
exec bash -c "$*"
