#!/usr/bin/env python3
"""Kafka source throughput and produce->applied latency (BENCHMARKS.md, "Kafka source").

    python3 scripts/bench-kafka.py TANSU_BIN target/release/reflex RECORDS WORK_DIR

Starts tansu (memory storage) on port 19301, produces RECORDS JSON events (100k users,
10k items, Pareto popularity) with confluent-kafka (`pip install confluent-kafka`), then
starts reflex on them (embedded store in WORK_DIR, bot rate limit off) and reports the
records/s from its first consumed batch to its last (read from /metrics), then produces
400 single events 20 ms apart and reports produce->applied p50/p99 as the upper bounds
of reflex_freshness_seconds buckets (the events are timestamped when produced). Extra
librdkafka settings for the source: EXTRA_PROPS='"fetch.wait.max.ms" = "10"'.
"""
import json, os, random, re, subprocess, sys, time, urllib.request
from confluent_kafka import Producer

TANSU = sys.argv[1]; REFLEX = sys.argv[2]; N = int(sys.argv[3]); WORK = sys.argv[4]
KP, GP, MP = 19301, 50301, 9301
url = f"tcp://127.0.0.1:{KP}"
tansu = subprocess.Popen([TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1)
for t, n in (("user_clicks", 4), ("lat", 1)):
    subprocess.run([TANSU, "topic", "create", t, "--partitions", str(n), "--broker", url], check=True,
                   stdout=subprocess.DEVNULL)
p = Producer({"bootstrap.servers": f"127.0.0.1:{KP}", "linger.ms": 20, "queue.buffering.max.messages": 1000000})
rnd = random.Random(7)
now = int(time.time() * 1000)
t0 = time.time()
kinds = ["view"] * 6 + ["click"] * 3 + ["add_to_cart", "purchase"]
for i in range(N):
    u = f"u{rnd.randrange(100000)}"
    item = f"i{int(rnd.paretovariate(1.2)) % 10000}"
    p.produce("user_clicks", key=u, value=json.dumps(
        {"event_id": f"e{i}", "user_id": u, "item_id": item, "kind": rnd.choice(kinds), "timestamp": now}))
    if i % 50000 == 0:
        p.poll(0)
p.flush()
print(f"produced {N} records in {time.time() - t0:.1f} s", flush=True)

cfg = os.path.join(WORK, "bench.toml")
open(cfg, "w").write(f'''
listen = "127.0.0.1:{GP}"
[metrics]
listen = "127.0.0.1:{MP}"
[engine.bot_filter]
max_events_per_user_per_sec = 0
[source.kafka]
enabled = true
brokers = "127.0.0.1:{KP}"
topics = {{ user_clicks = "payload", lat = "click" }}
[source.kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
{os.environ.get("EXTRA_PROPS", "")}
''')
env = dict(os.environ, RUST_LOG="warn")
server = subprocess.Popen([REFLEX, "serve", "--config", cfg, "--data-dir", os.path.join(WORK, "data")],
                          env=env, stdout=subprocess.DEVNULL)

def metrics():
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{MP}/metrics", timeout=2).read().decode()
    except Exception:
        return ""

def total(text, outcome):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith("reflex_kafka_records_total{") and f'outcome="{outcome}"' in l)

first = None
while True:
    text = metrics()
    done = sum(total(text, o) for o in ("accepted", "duplicate", "rejected", "filtered", "unparseable"))
    if done > 0 and first is None:
        first, first_n = time.time(), done
    if done >= N:
        end = time.time(); break
    time.sleep(0.2)
text = metrics()
print(f"consumed {N}: accepted {total(text, 'accepted'):.0f}; "
      f"{(N - first_n) / (end - first):,.0f} records/s from the first batch to the last", flush=True)

# Latency: one event at a time, timestamped at produce; freshness = produce -> applied.
before = {m.group(1): float(m.group(2)) for m in re.finditer(r'reflex_freshness_seconds_bucket\{le="([^"]+)"\} (\S+)', text)}
lp = Producer({"bootstrap.servers": f"127.0.0.1:{KP}", "linger.ms": 0})
for i in range(400):
    lp.produce("lat", key=f"l{i}", value=json.dumps({"user_id": f"l{i}", "item_id": "i1",
                                                    "timestamp": int(time.time() * 1000)}))
    lp.flush()
    time.sleep(0.02)
time.sleep(2)
text = metrics()
after = {m.group(1): float(m.group(2)) for m in re.finditer(r'reflex_freshness_seconds_bucket\{le="([^"]+)"\} (\S+)', text)}
counts = sorted(((float(k) if k != "+Inf" else float("inf")), after[k] - before.get(k, 0)) for k in after)
n = counts[-1][1]
for q in (0.5, 0.99):
    le = next(b for b, c in counts if c >= q * n)
    print(f"produce->applied p{int(q*100)} <= {le*1000:g} ms (of {n:.0f} events)")
server.terminate(); server.wait(); tansu.kill()
