#!/usr/bin/env bash
# Recommend alone, flat out, after a refit has fitted item-to-item weights: the cost of
# serving with them (BENCHMARKS.md, "Recommend with fitted weights, end to end").
#
# usage: scripts/bench-item-item.sh ITEMS SHARE [OUT]
#   ITEMS  catalog size of the synthetic shop (100000 users, 5 events each)
#   SHARE  signals.item_item_share for the server (0: weights fitted but unused)
#   OUT    bench JSON (default: bench-item-item-ITEMS-SHARE.json)
# REFLEX_BIN (default target/release/reflex) and PYTHON (a python with the client of
# clients/python installed, default python3) say what to run.
set -euo pipefail
ITEMS=$1 SHARE=$2
OUT=${3:-bench-item-item-$ITEMS-$SHARE.json}
BIN=${REFLEX_BIN:-target/release/reflex}
PY=${PYTHON:-python3}
ADDR=127.0.0.1:50051
DATA=$(mktemp -d)
REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC=0 \
  REFLEX_SIGNALS__ITEM_ITEM_SHARE="$SHARE" RUST_LOG=warn \
  "$BIN" serve --listen "$ADDR" --data-dir "$DATA" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER; rm -rf "$DATA"' EXIT
sleep 1
# Seed the shop (the one-second measurement is thrown away).
"$BIN" bench --addr "$ADDR" --items "$ITEMS" --users 100000 --streams 0 --recommenders 1 \
  --duration 1 --noop-duration 0 --probe-ms 0 --warmup 0 >/dev/null
"$PY" - "$ADDR" <<'PY'
import sys
from reflex_client import Client
print(Client(sys.argv[1]).refit(timeout=600))
PY
"$BIN" bench --addr "$ADDR" --server-pid "$SERVER" --items "$ITEMS" --users 100000 \
  --seed-events 0 --no-seed-items --streams 0 --recommenders 4 --probe-ms 0 --warmup 3 \
  --duration 20 --noop-duration 0 --json >"$OUT"
echo "wrote $OUT"
