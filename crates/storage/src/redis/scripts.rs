//! The Lua scripts that make each Redis write atomic. Each runs as one `EVALSHA` and
//! touches only the keys it is given, all in one hash slot on Cluster.

/// The Lua function both log scripts use to append records: see [`APPEND`].
macro_rules! append_records_lua {
    () => {
        r#"
-- Appends the n records whose triples (1 apply, 2 filtered or 0 erase; ingested ms;
-- encoded record) start at ARGV[first], taking dedupe keys from KEYS[k + 1] on; KEYS[1]
-- is the log stream and KEYS[2] the sequence counter. Calls appended(i, seq, o) for
-- each record appended (o: where its triple starts). Returns the sequence number of
-- each record (0 for a duplicate) and the index of the last dedupe key taken. Uses the
-- locals window and maxlen, which the script defines before it.
local function append_records(first, n, k, appended)
  local fresh, count = {}, 0
  for i = 1, n do
    if ARGV[first + (i - 1) * 3] ~= '0' then
      k = k + 1
      fresh[i] = redis.call('SET', KEYS[k], '1', 'NX', 'PX', window) and true or false
    else
      fresh[i] = true
    end
    if fresh[i] then count = count + 1 end
  end
  local out, seq = {}, 0
  if count > 0 then seq = redis.call('INCRBY', KEYS[2], count) - count end
  for i = 1, n do
    local o = first + (i - 1) * 3
    if fresh[i] then
      seq = seq + 1
      local id = string.format('%d-0', seq)
      if maxlen > 0 then
        redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, id, 't', ARGV[o + 1], 'r', ARGV[o + 2])
      else
        redis.call('XADD', KEYS[1], id, 't', ARGV[o + 1], 'r', ARGV[o + 2])
      end
      out[i] = seq
      appended(i, seq, o)
    else
      out[i] = 0
    end
  end
  return out, k
end
"#
    };
}

/// Appends records to the log. Per event record it sets the dedupe key with `SET NX PX`
/// and, only if that succeeded, `XADD`s the record with stream id `<seq>-0`, the
/// sequence numbers taken for the whole call with one `INCRBY`; erase records are always
/// appended. Dedupe key and log entry are written together or not at all.
///
/// Each new event that profiles will apply (not a filtered one) also goes into the
/// pending set (scored by ingest time) until it is applied, so a writer that dies (or
/// times out) between the two cannot lose the update: maintenance applies what stays
/// pending. Filtered events are never applied, so marking them would only leave marks
/// that repair reads again on every tick.
///
/// KEYS: log stream, sequence counter, pending set, then one dedupe key per event record.
/// ARGV: dedupe window ms, max log length (0 = unbounded), then per record the triple
/// (`1` for an event to apply, `2` for a filtered event, `0` for an erase; ingested ms;
/// encoded record).
/// Returns one integer per record: its sequence number, or 0 for a duplicate.
pub(super) const APPEND: &str = concat!(
    r#"
local window = ARGV[1]
local maxlen = tonumber(ARGV[2])
local n = (#ARGV - 2) / 3
"#,
    append_records_lua!(),
    r#"
local pending = {}
local out = append_records(3, n, 3, function(i, seq, o)
  if ARGV[o] == '1' then
    pending[#pending + 1] = ARGV[o + 1]
    pending[#pending + 1] = string.format('%d', seq)
    if #pending >= 1000 then
      redis.call('ZADD', KEYS[3], unpack(pending))
      pending = {}
    end
  end
end)
if #pending > 0 then redis.call('ZADD', KEYS[3], unpack(pending)) end
return out
"#
);

/// The Lua function both profile scripts use to apply one user's events: see [`APPLY`].
macro_rules! apply_user_lua {
    () => {
        r#"
-- Applies the events at ARGV[from .. to] (7 values each: position or record index,
-- event ms, ingested ms, weight, kind, item, session) to the user whose keys are h, r,
-- b; take(o) gives the position of the event at o, or nil to skip it. With `guarded`, an
-- event whose position is among the user's last 16 applied (field `as`) is skipped as
-- well, and the field is kept; without, it is neither read nor written. Uses the locals
-- max_recent, max_purchased, gap and ttl, which the script defines before it.
local function entry_ms(e)
  return tonumber(string.sub(e, 1, string.find(e, '\31', 1, true) - 1))
end
local function apply_user(h, r, b, from, to, take, guarded)
  local names = {'sid', 'sst', 'slt', 'sn', 'ls', 't', 'v', 'c:purchase'}
  local slot_of = {['c:purchase'] = 8}
  local n_names = 8
  if guarded then
    n_names = 9
    names[9] = 'as'
  end
  for o = from, to, 7 do
    local field = 'c:' .. ARGV[o + 4]
    if not slot_of[field] then
      n_names = n_names + 1
      names[n_names] = field
      slot_of[field] = n_names
    end
  end
  local f = redis.call('HMGET', h, unpack(names))
  local sid_now, sst_s, slt_s, sn = f[1], f[2], f[3], tonumber(f[4] or '0')
  local ls_s, t_s = f[5], f[6]
  local ls, t = tonumber(ls_s or '0'), tonumber(t_s or '0')
  -- Positions applied lately, newest first, and the same as a set (guarded only).
  local applied, seen
  if guarded then
    applied, seen = {}, {}
    for p in string.gmatch(f[9] or '', '[^,]+') do
      applied[#applied + 1] = p
      seen[p] = true
    end
  end
  local counts = {}
  local ls_changed, t_changed = false, false
  local applied_now = 0
  -- Event time of the recent list's head (nil: empty): the newest event applied, which
  -- the list never drops, so last-seen (`ls`) without reading the list.
  local head_ms = ls_s and ls or nil
  for o = from, to, 7 do
    local seq = take(o)
    if seq and guarded then
      if seen[seq] then
        seq = nil -- among the last 16 applied
      else
        table.insert(applied, 1, seq)
        seen[seq] = true
      end
    end
    if seq then
    applied_now = applied_now + 1
    local ts_s, now_s, w, kind, item, sid = ARGV[o + 1], ARGV[o + 2], ARGV[o + 3], ARGV[o + 4], ARGV[o + 5], ARGV[o + 6]
    local ts, now = tonumber(ts_s), tonumber(now_s)
    local field = 'c:' .. kind
    counts[field] = (counts[field] or 0) + 1

    if max_recent > 0 then
      local entry = ts_s .. '\31' .. w .. '\31' .. kind .. '\31' .. item
      if (not head_ms) or head_ms <= ts then
        if redis.call('LPUSH', r, entry) > max_recent then
          redis.call('LTRIM', r, 0, max_recent - 1)
        end
        head_ms = ts
      else
        local entries = redis.call('LRANGE', r, 0, max_recent - 1)
        local pos = #entries + 1
        for j = 1, #entries do
          if entry_ms(entries[j]) <= ts then
            pos = j
            break
          end
        end
        if pos <= max_recent then
          if pos > #entries then
            redis.call('RPUSH', r, entry)
          else
            redis.call('LINSERT', r, 'BEFORE', entries[pos], entry)
          end
        end
        redis.call('LTRIM', r, 0, max_recent - 1)
      end
    end

    local extend
    if sid ~= '' then
      extend = (sid_now == sid)
      if not extend then
        sid_now, sst_s, slt_s, sn = sid, ts_s, ts_s, 1
      end
    else
      extend = sid_now and slt_s and (ts - tonumber(slt_s) <= gap)
      if not extend then
        sid_now, sst_s, slt_s, sn = 'auto-' .. ts_s, ts_s, ts_s, 1
      end
    end
    if extend then
      if ts < tonumber(sst_s) then sst_s = ts_s end
      if ts > tonumber(slt_s) then slt_s = ts_s end
      sn = sn + 1
    end

    if kind == 'purchase' and not redis.call('LPOS', b, item) then
      redis.call('RPUSH', b, item)
      if max_purchased > 0 then
        redis.call('LTRIM', b, -max_purchased, -1)
      else
        redis.call('DEL', b)
      end
    end

    if ts > ls then ls, ls_s, ls_changed = ts, ts_s, true end
    if now > t then t, t_s, t_changed = now, now_s, true end
    end
  end
  if applied_now == 0 then return end
  local fields = {'v', string.format('%d', tonumber(f[7] or '0') + applied_now),
    'sid', sid_now, 'sst', sst_s, 'slt', slt_s, 'sn', string.format('%d', sn)}
  if guarded then
    fields[#fields + 1] = 'as'
    fields[#fields + 1] = table.concat(applied, ',', 1, math.min(16, #applied))
  end
  for field, n in pairs(counts) do
    fields[#fields + 1] = field
    fields[#fields + 1] = string.format('%d', tonumber(f[slot_of[field]] or '0') + n)
  end
  if ls_changed then fields[#fields + 1] = 'ls'; fields[#fields + 1] = ls_s end
  if t_changed then fields[#fields + 1] = 't'; fields[#fields + 1] = t_s end
  redis.call('HSET', h, unpack(fields))
  local expire_at = string.format('%d', t + ttl)
  redis.call('PEXPIREAT', h, expire_at)
  redis.call('PEXPIREAT', r, expire_at)
  -- Purchases are only ever listed with their count: no count, no list to expire.
  if tonumber(f[8] or '0') + (counts['c:purchase'] or 0) > 0 then
    redis.call('PEXPIREAT', b, expire_at)
  end
end
"#
    };
}

/// Applies events to the profiles of one or more users, for each exactly as
/// `Profile::apply` does in memory: counters, the recent list ordered newest first by
/// event time and bounded, the session, the bounded purchase list, last-seen and touched
/// times, the version, and the TTL (`PEXPIREAT` touched + ttl, so a profile touched too
/// long ago is gone at once).
///
/// One call covers every user of a batch whose keys share a hash slot: all of them on a
/// standalone Redis, where a batch costs one call whatever its users; on Cluster the
/// caller groups users by slot. `EVALSHA` and the Lua call around each script cost Redis
/// more CPU than the few commands a user's events need, so fewer calls is what lets one
/// Redis ingest more.
///
/// KEYS: on a standalone Redis first the pending set and the sequence counter of the log
/// (on Cluster those live in another slot and cannot be given), then per user its
/// profile hash, recent list and purchase list.
/// ARGV: max recent, max purchased, session gap ms, ttl ms, `1` when the pending set and
/// counter are given (else `0`), then per user the number of its events followed by, per
/// event, the seven (log position, event ms, ingested ms, weight, kind label, item id,
/// session id or empty), a user's events in order. Recent entries are
/// `ms \x1f weight \x1f kind \x1f item`.
///
/// Exactly once: with the pending set given, an event is applied only if its position is
/// pending, and the same script removes it from the set, so applying and confirming are
/// one atomic step: a script that runs after its caller timed out, a repair that read the
/// set before the first apply confirmed, or a client that sends the script twice find
/// the position no longer pending and change nothing. A position beyond the log's
/// counter was never appended (callers that apply without the log, like the conformance
/// suite) and falls back to the guard below. Without the pending set (Cluster), and for
/// such positions, an event whose position is among the profile's last 16 applied (field
/// `as`) is skipped, and the caller confirms after the script: a stall or a kill between
/// the two can still apply an older position twice there.
///
/// Per user, the hash fields it needs (counters and version included) are read with one
/// `HMGET` and written with one `HSET`; the recent list's head is not read (its event
/// time is last-seen, `ls`: the newest event is never trimmed), and the purchase list is
/// only given a TTL when the purchase count says it exists. The pending positions of the
/// whole call are checked with one `ZMSCORE` and confirmed with one `ZREM` (per 1,000).
/// A user's first event costs `HMGET`, `LPUSH`, `HSET` and two `PEXPIREAT`s.
pub(super) const APPLY: &str = concat!(
    r#"
local max_recent = tonumber(ARGV[1])
local max_purchased = tonumber(ARGV[2])
local gap = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])"#,
    apply_user_lua!(),
    r#"local pend = nil
local first_key = 1
if ARGV[5] == '1' then
  pend = KEYS[1]
  first_key = 3
end
-- With the pending set: which positions are pending (to apply and confirm), and the
-- log's last position (a position at or below it that is not pending was applied).
local pending, last, confirm = {}, nil, {}
if pend then
  last = tonumber(redis.call('GET', KEYS[2]) or '0')
  local seqs = {}
  local o = 6
  while o <= #ARGV do
    local n = tonumber(ARGV[o])
    for e = 0, n - 1 do seqs[#seqs + 1] = ARGV[o + 1 + e * 7] end
    o = o + 1 + n * 7
  end
  for i = 1, #seqs, 1000 do
    local chunk = {unpack(seqs, i, math.min(i + 999, #seqs))}
    local scores = redis.call('ZMSCORE', pend, unpack(chunk))
    for j = 1, #chunk do
      if scores[j] then pending[chunk[j]] = true end
    end
  end
end
-- An event is applied if its position is pending (and confirmed with it), or, beyond
-- the log's counter or without the pending set, unless the profile lists it.
local function take(o)
  local seq = ARGV[o]
  if pending[seq] then
    pending[seq] = nil
    confirm[#confirm + 1] = seq
    return seq
  end
  if last and tonumber(seq) <= last then return nil end
  return seq
end
local k, o = first_key, 6
while o <= #ARGV do
  local n = tonumber(ARGV[o])
  apply_user(KEYS[k], KEYS[k + 1], KEYS[k + 2], o + 1, o + n * 7, take, true)
  k, o = k + 3, o + 1 + n * 7
end
for i = 1, #confirm, 1000 do
  redis.call('ZREM', pend, unpack(confirm, i, math.min(i + 999, #confirm)))
end
return 1

"#
);

/// Appends records as [`APPEND`] does and applies the new events to their users' profiles
/// as [`APPLY`] does, in one step: for a standalone Redis, where one script reaches the
/// log and every profile. Nothing is ever pending in between (the step is atomic: a
/// script that runs late, after its caller timed out, runs whole), so the pending set is
/// not touched, and a batch costs one `EVALSHA` and one round trip. For the same reason
/// an event is applied exactly when its record is appended, so the last-16 guard (field
/// `as`) is neither read nor written here: on a standalone Redis, [`APPLY`] only applies
/// positions the pending set holds, which never needs it. Leaving it out costs Redis
/// about a third less CPU per event when a batch's events come from different users (a
/// synthetic replay of such batches: 70–78 µs an event against 47–53 µs).
///
/// KEYS: log stream, sequence counter, one dedupe key per event record, then per user its
/// profile hash, recent list and purchase list.
/// ARGV: dedupe window ms, max log length (0 = unbounded), max recent, max purchased,
/// session gap ms, ttl ms, the number of records, per record the triple of [`APPEND`]
/// (`1` apply, `2` filtered, `0` erase; ingested ms; encoded record), then per user the
/// number of its events followed by, per event, the seven of [`APPLY`] with the record's
/// index (from 1) in place of its log position.
/// Returns one integer per record: its sequence number, or 0 for a duplicate (not applied).
pub(super) const APPEND_APPLY: &str = concat!(
    r#"
local window = ARGV[1]
local maxlen = tonumber(ARGV[2])
local max_recent = tonumber(ARGV[3])
local max_purchased = tonumber(ARGV[4])
local gap = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local n = tonumber(ARGV[7])
"#,
    append_records_lua!(),
    r#"
local seq_of = {}
local out, k = append_records(8, n, 2, function(i, seq)
  seq_of[string.format('%d', i)] = string.format('%d', seq)
end)
"#,
    apply_user_lua!(),
    r#"
-- A record appended now is applied; a duplicate (no position) is not.
local function take(o) return seq_of[ARGV[o]] end
local o = 8 + n * 3
while o <= #ARGV do
  local m = tonumber(ARGV[o])
  apply_user(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], o + 1, o + m * 7, take, false)
  k, o = k + 3, o + 1 + m * 7
end
return out
"#
);

/// Reads one profile consistently (no update can land between the three reads).
///
/// KEYS: profile hash, recent list, purchase list.
/// Returns `{hash fields and values, recent entries, purchases}`, or nil when absent.
pub(super) const GET: &str = r#"
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return nil end
return {fields, redis.call('LRANGE', KEYS[2], 0, -1), redis.call('LRANGE', KEYS[3], 0, -1)}
"#;

/// Writes catalog items and bumps the catalog version in one step, so replicas that see
/// the new version also see the items.
///
/// KEYS: catalog hash, catalog version. ARGV: item id and encoded item, repeated.
pub(super) const CATALOG_UPSERT: &str = r#"
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return redis.call('INCR', KEYS[2])
"#;

/// Deletes one catalog item and, if it was there, bumps the catalog version.
///
/// KEYS: catalog hash, catalog version. ARGV: item id. Returns 1 when it was there.
pub(super) const CATALOG_DELETE: &str = r#"
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed > 0 then redis.call('INCR', KEYS[2]) end
return removed
"#;

/// Stores a model snapshot and its metadata together.
///
/// KEYS: snapshot key, versions hash. ARGV: version id, encoded metadata, snapshot.
pub(super) const MODEL_SAVE: &str = r#"
redis.call('SET', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"#;

/// Takes or renews a lease: granted when free or already the caller's.
///
/// KEYS: lease key. ARGV: holder, ttl ms. Returns 1 when held by the caller now.
pub(super) const LEASE_ACQUIRE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Gives a lease up if the caller holds it.
///
/// KEYS: lease key. ARGV: holder.
pub(super) const LEASE_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Bumps the rollback generation and records the version it installed.
///
/// KEYS: rollbacks hash. ARGV: version. Returns the new generation.
pub(super) const RECORD_ROLLBACK: &str = r#"
local g = redis.call('HINCRBY', KEYS[1], 'generation', 1)
redis.call('HSET', KEYS[1], 'version', ARGV[1])
return g
"#;
