#!/usr/bin/env bash
# An outside view of Envoy's external authorization: h2load (nghttp2-client) sends the same
# gRPC bodies Envoy and a health probe send, and the server's rates are compared. Pin the
# server and h2load to cores of their own, so the load generator's work is not counted
# against the server:
#
#   createdb -h 127.0.0.1 -U postgres authd_outside
#   export DATABASE__URL=postgres://postgres@127.0.0.1:5432/authd_outside
#   cargo build --release && target/release/authd migrate
#   EXT_AUTHZ__ENABLED=true LOCAL_CACHE__ENABLED=true LOG__LEVEL=off METRICS__ADDR=127.0.0.1:9466 \
#     taskset -c 0 target/release/authd &
#   taskset -c 1 benches/outside/ext_authz.sh            # ADDR=127.0.0.1:50051 REQUESTS=300000
#
# Needs grpcurl, jq, python3, curl and h2load on PATH.
set -euo pipefail
addr=${ADDR:-127.0.0.1:50051}
requests=${REQUESTS:-300000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

email="outside-$(date +%s%N)@example.com"
password="correct horse battery staple"
grpcurl -plaintext -d "{\"email\": \"$email\", \"password\": \"$password\", \"display_name\": \"Outside\"}" \
  "$addr" authd.v1.AuthService/Register > /dev/null
token=$(grpcurl -plaintext -d "{\"email\": \"$email\", \"password\": \"$password\", \"client\": {\"ip_address\": \"127.0.0.1\", \"user_agent\": \"h2load\"}}" \
  "$addr" authd.v1.AuthService/Login | jq -r .sessionToken)

# The gRPC bodies (a 5-byte frame header, then the message), encoded by hand: a
# HealthCheckRequest, a ValidateSessionRequest, the same padded with an unknown field to the
# CheckRequest's size, and a CheckRequest as Envoy sends one for a browser's GET (the bench's
# `ext_authz_check` request).
python3 - "$token" "$work" <<'EOF'
import struct, sys
token, out = sys.argv[1], sys.argv[2]
def varint(n):
    b = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return b + bytes([low])
        b += bytes([low | 0x80])
def field(number, data):
    data = data.encode() if isinstance(data, str) else data
    return varint(number << 3 | 2) + varint(len(data)) + data
def frame(name, message):
    open(f"{out}/{name}", "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
headers = [
    (":authority", "shop.example"), (":method", "GET"), (":path", "/orders?page=2"),
    (":scheme", "https"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("accept-encoding", "gzip, deflate, br"), ("accept-language", "en-GB,en;q=0.9"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36"),
    ("x-forwarded-proto", "https"), ("x-request-id", "9b2c1f0e-5d1e-4c3b-9a8f-2e7d6c5b4a39"),
    ("authorization", "Bearer " + token),
]
# HttpRequest: method 2, headers 3 (map entries: key 1, value 2), path 4, host 5;
# Request.http 2; AttributeContext.request 4; CheckRequest.attributes 1.
http = (field(2, "GET") + b"".join(field(3, field(1, k) + field(2, v)) for k, v in headers)
        + field(4, "/orders?page=2") + field(5, "shop.example"))
check = field(1, field(4, field(2, http)))
validate = field(1, token)
frame("health", b"")
frame("check", check)
frame("validate", validate)
frame("validate_padded", validate + field(100, "x" * (len(check) - len(validate) - 3)))
EOF

# Each body once, to see it answered as meant (h2load counts HTTP statuses; gRPC's is in the
# trailers): OK, and for Check an allowed request (the identity header set).
answers() {
  curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
    --data-binary "@$work/$2" -D - "http://$addr/$1" | grep -a "$3" > /dev/null \
    || { echo "$1 ($2) was not answered with $3" >&2; exit 1; }
}
answers grpc.health.v1.Health/Check health 'grpc-status: 0'
answers authd.v1.AuthService/ValidateSession validate 'grpc-status: 0'
answers authd.v1.AuthService/ValidateSession validate_padded 'grpc-status: 0'
answers envoy.service.auth.v3.Authorization/Check check 'x-authd-user-id'

rate() {
  h2load -n "$requests" -c 4 -m 32 -H 'content-type: application/grpc' -H 'te: trailers' \
    -d "$work/$2" "http://$addr/$1" 2>&1 \
    | awk '/^finished in/ { gsub(",", "", $4); print $4 } /^requests:/ { if ($10 != 0 || $12 != 0 || $14 != 0) { print "h2load: failures: " $0 > "/dev/stderr"; exit 1 } }'
}
health=$(rate grpc.health.v1.Health/Check health)
printf '%-34s %10s req/s\n' "Health/Check" "$health"
for case in "authd.v1.AuthService/ValidateSession validate" \
  "authd.v1.AuthService/ValidateSession validate_padded" \
  "envoy.service.auth.v3.Authorization/Check check"; do
  set -- $case
  r=$(rate "$1" "$2")
  printf '%-34s %10s req/s  %3.0f%% of Health/Check\n' "$2" "$r" "$(awk -v r="$r" -v h="$health" 'BEGIN { print 100 * r / h }')"
done
