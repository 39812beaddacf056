#!/usr/bin/env bash
# Instructions per request for the layer and its peers, counted by callgrind: exact and
# repeatable whatever else the machine is doing, so a change's cost can be compared.
#
#   bash .ci/callgrind.sh [REQUESTS] [sdk]     (default 20000; needs valgrind)
#
# Each variant runs REQUESTS requests (tenant known, requests built before counting) in
# benches/callgrind.rs; only instructions inside its `measured` function are counted. The
# requests carry only the tenant and estimate headers, or with `sdk` also the 17 other
# headers an OpenAI SDK sends. BENCH_TENANT sets the tenant id (default tenant-a).
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-20000}
headers=${2:-}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install -y valgrind)" >&2; exit 1; }

bin=$(cargo bench --bench callgrind --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "could not build the callgrind bench" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

count() {
  valgrind --tool=callgrind --toggle-collect='*measured*' \
    --callgrind-out-file="$out/$1.out" "$bin" "$1" "$requests" $headers >/dev/null 2>&1
  # The warm-up request is counted too: REQUESTS + 1 requests in all.
  awk -v n="$((requests + 1))" '/^(summary|totals):/ { printf "%.0f\n", $2 / n; exit }' "$out/$1.out"
}

bare=$(count bare)
printf 'instructions per request (callgrind, %s requests%s; bare service_fn: %s)\n\n' \
  "$requests" "${headers:+ with SDK headers}" "$bare"
printf '%-32s %12s %12s\n' variant "over bare" "÷ governor"
governor=$(( $(count governor) - bare ))
for variant in tower-tenant-tokens tower-tenant-tokens-handle tower-tenant-tokens-window \
  tower-tenant-tokens-fn tower-tenant-tokens-priority concurrency-limit governor naive; do
  total=$(count "$variant")
  over=$((total - bare))
  printf '%-32s %12d %12s\n' "$variant" "$over" "$(awk -v a="$over" -v b="$governor" 'BEGIN { printf "%.2f", a / b }')"
done
