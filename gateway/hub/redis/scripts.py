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

# KEYS[1] stream, KEYS[2] channel index (zset: channel -> last publish ms).
# ARGV: event, data, size, max_age_ms, ttl_ms, notify topic, notify message, channel.
# Returns {id, prev}.
APPEND = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if #top > 0 then prev = top[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'e', ARGV[1], 'd', ARGV[2], 'p', prev)
local ms = tonumber(string.match(id, '^(%d+)'))
local cutoff = ms - tonumber(ARGV[4])
if cutoff > 0 then redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d', cutoff)) end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ms, ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%d', ms - tonumber(ARGV[5])))
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {id, prev}
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
