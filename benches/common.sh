# Sourced by the bench scripts: a scratch directory ($WORK) removed on exit, the background
# processes they start ($PIDS, killed on exit), and a free loopback port.
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  exec 3>&- 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# port: a TCP port on 127.0.0.1 that was free a moment ago.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
