#!/bin/bash
# Container health check of tde-broker, with nothing but bash and coreutils (the runtime image
# has no curl or wget). Installed in the image as /usr/local/bin/tde-broker-healthcheck.
#
# 1. When the HTTP admin listener (`serve --http-listen`, 127.0.0.1:9090 by default) accepts a
#    connection, GET /healthz must answer 200.
# 2. When nothing listens there (a broker started without --http-listen), one authenticated gRPC
#    call instead: `tde-broker clock show` (Emulation.GetClock) with the admin token and the dev
#    CA of the data directory. That is a full round trip: TLS, the auth interceptor, the broker.
#
# Environment:
#   TDE_BROKER_HEALTHCHECK_HTTP  host:port of the HTTP admin listener [127.0.0.1:9090];
#                                `off` goes straight to the gRPC call
#   TDE_BROKER_BIN               the broker binary [/usr/local/bin/tde-broker]
#   TDE_BROKER_SERVER            gRPC URL for step 2 (the image sets https://127.0.0.1:50051)
#   TDE_BROKER_DATA_DIR          data directory holding admin.token and tls/ca.pem
#                                (the image sets /var/lib/tde-broker)
#
# Exit status (what Docker expects): 0 healthy, 1 unhealthy.
set -u

http="${TDE_BROKER_HEALTHCHECK_HTTP:-127.0.0.1:9090}"
cr=$'\r'
bin="${TDE_BROKER_BIN:-/usr/local/bin/tde-broker}"

# GET /healthz from $1 (host:port or [v6]:port).
# Returns 0 on 200, 1 on any other answer or none, 2 when nothing accepts the connection.
http_check() {
  local addr="$1" host port version status rest
  host="${addr%:*}"
  port="${addr##*:}"
  host="${host#[}"
  host="${host%]}"
  { exec 3<>"/dev/tcp/${host}/${port}"; } 2>/dev/null || return 2
  printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nUser-Agent: tde-broker-healthcheck\r\nConnection: close\r\n\r\n' \
    "$addr" >&3 2>/dev/null
  if ! IFS=' ' read -r -t 4 version status rest <&3; then
    exec 3<&-
    echo "unhealthy: no HTTP answer from http://${addr}/healthz"
    return 1
  fi
  exec 3<&-
  status="${status%"$cr"}"
  if [ "$status" = "200" ]; then
    echo "healthy: GET http://${addr}/healthz answered 200"
    return 0
  fi
  echo "unhealthy: GET http://${addr}/healthz answered ${version%"$cr"} ${status:-(no status)} ${rest%"$cr"}"
  return 1
}

# One authenticated gRPC call.
grpc_check() {
  local out
  if out="$(timeout 8 "$bin" clock show 2>&1)"; then
    echo "healthy: gRPC Emulation.GetClock answered (${TDE_BROKER_SERVER:-the CLI default server})"
    return 0
  fi
  echo "unhealthy: gRPC Emulation.GetClock failed: ${out:0:400}"
  return 1
}

if [ "$http" != "off" ]; then
  http_check "$http"
  rc=$?
  if [ "$rc" -ne 2 ]; then
    exit "$rc"
  fi
  echo "nothing listens on ${http} (no --http-listen?): checking gRPC instead"
fi
grpc_check || exit 1
