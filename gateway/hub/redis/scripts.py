"""The store's Lua scripts (each one round trip, atomic) and how their replies become Events."""

from __future__ import annotations

from typing import Any

from gateway.hub.events import Event
from gateway.ids import parse

__all__ = ["APPEND", "READ", "event_from_entry"]

# Ids are compared as strings without leading zeros: longer is bigger, else lexicographic.
# (Lua numbers are doubles, which cannot hold every 64-bit id part exactly.)
_ID_LESS = """
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
"""

# KEYS: stream, its byte count, then the idempotency key (if ARGV[9] == '1'), then the channel
# index (a zset: channel -> last publish ms; if ARGV[10] == '1': in a cluster it lives on another
# shard, so the caller updates it apart). ARGV: event, data, size, max_age_ms, ttl_ms, notify
# topic, notify message, channel, has key, has index, max_bytes, the fixed cost of an event beyond its name and data
# (as the memory store counts it).
# In a cluster PUBLISH reaches every node, so one subscription anywhere hears every shard.
# Returns {id, prev, 0} for a new event, or {id, prev, 1, event, data} for a repeated key.
# History is trimmed oldest first while it holds more than `size` events, events older than
# max_age, or more than max_bytes (names, data, overhead); the newest event always stays.
APPEND = """
local stream, counter = KEYS[1], KEYS[2]
local n = 2
local idem, index
if ARGV[9] == '1' then n = n + 1; idem = KEYS[n] end
if ARGV[10] == '1' then n = n + 1; index = KEYS[n] end
if idem then
  local first = redis.call('GET', idem)
  if first then
    local id, prev = string.match(first, '^(%S+) (%S+)$')
    local e, d = ARGV[1], ARGV[2]
    local found = redis.call('XRANGE', stream, id, id)
    if #found > 0 then
      local f = found[1][2]
      for i = 1, #f, 2 do
        if f[i] == 'e' then e = f[i + 1] elseif f[i] == 'd' then d = f[i + 1] end
      end
    end
    return {id, prev, 1, e, d}
  end
end
local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local prev = '0-0'
local bytes = 0
if #top > 0 then
  prev = top[1][1]
  bytes = tonumber(redis.call('GET', counter) or '0')
end
local id = redis.call('XADD', stream, '*', 'e', ARGV[1], 'd', ARGV[2], 'p', prev)
local ms = tonumber(string.match(id, '^(%d+)'))
local size, max_bytes = tonumber(ARGV[3]), tonumber(ARGV[11])
local cutoff = ms - tonumber(ARGV[4])
local len = redis.call('XLEN', stream)
local overhead = tonumber(ARGV[12])
bytes = bytes + #ARGV[1] + #ARGV[2] + overhead
local from, keep = '-', nil
-- Usually one event goes (history is full) or none: look at 2 first, then more at a time.
local count = 2
while len > 1 and not keep do
  local entries = redis.call('XRANGE', stream, from, '+', 'COUNT', count)
  if count < 64 then count = count * 4 end
  for _, entry in ipairs(entries) do
    local f = entry[2]
    local cost = 0
    for i = 1, #f, 2 do
      if f[i] == 'e' or f[i] == 'd' then cost = cost + #f[i + 1] end
    end
    cost = cost + overhead
    local old = tonumber(string.match(entry[1], '^(%d+)')) < cutoff
    if entry[1] == id or not (len > size or bytes > max_bytes or old) then keep = entry[1]; break end
    len = len - 1
    bytes = bytes - cost
    from = '(' .. entry[1]
  end
  if #entries == 0 then break end
end
if keep and from ~= '-' then redis.call('XTRIM', stream, 'MINID', keep) end
redis.call('SET', counter, string.format('%d', bytes), 'PX', ARGV[5])
redis.call('PEXPIRE', stream, ARGV[5])
if idem then redis.call('SET', idem, id .. ' ' .. prev, 'PX', ARGV[4]) end
if index then
  redis.call('ZADD', index, ms, ARGV[8])
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. string.format('%d', ms - tonumber(ARGV[5])))
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {id, prev, 0}
"""

# KEYS[1] stream. ARGV: since (canonical; "" = from now), limit, max_age_ms.
# Returns {last ("" = no such channel), known (0/1), entries after since (up to limit + 1)}.
# Events older than max_age are treated as gone even before an append trims them.
READ = (
    _ID_LESS
    + """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top == 0 then return {'', 0, {}} end
local last = top[1][1]
local since = ARGV[1]
if since == '' or since == last then return {last, 1, {}} end
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
if cutoff < 0 then cutoff = 0 end
local floor = string.format('%d-0', cutoff)
local start = floor
local known = 0
local has_before = false
if not id_less(since, floor) then
  start = '(' .. since
  local before = redis.call('XREVRANGE', KEYS[1], since, floor, 'COUNT', 1)
  if #before > 0 then
    has_before = true
    if before[1][1] == since then known = 1 end
  end
end
local entries = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', tonumber(ARGV[2]) + 1)
if not has_before and #entries > 0 then
  -- since precedes everything retained: known only as the oldest event's predecessor
  local fields = entries[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' and fields[i + 1] == since then known = 1 end
  end
end
return {last, known, entries}
"""
)


def event_from_entry(entry: list[Any]) -> Event:
    """A stream entry [id, [field, value, ...]] as the Event it stores."""
    id_, flat = entry
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    key = parse(id_)
    return Event(id_, fields["e"], fields["d"], key, fields["p"], key[0] / 1000)
