-- stream_append: appends one event to a task's stream, within its attempt's caps.
--
-- stream_append(
--   keys=[stream, record, output_state],
--   args=[kind, attempt, data, max_entries, max_bytes, ttl, task_id, now, output_interval]
-- )
--
-- stream: K.stream .. task_id (passed in, like the task scripts' records). record: the task's
-- record, K.task .. task_id (its webhook and webhook_events are read). output_state: the task's
-- task.output coalescing hash, K.output .. task_id. kind: 'output', 'restart', 'error' or
-- 'done' (the last two end the stream). attempt: the writer's delivery of the task
-- (task_start's count, from 1). data: the event's text as readers get it. max_entries,
-- max_bytes: the caps of one attempt (STREAM_MAX_ENTRIES, STREAM_MAX_BYTES) on its output
-- entries and their data bytes; a restart mark and the ending are not capped (one of each per
-- attempt at most), so a task over its cap can still end its stream with its error. ttl: the
-- stream's TTL in seconds (RESULT_TTL), set again by every append. task_id: the task's id (the
-- task.output event's id is made of it). now: epoch seconds. output_interval: the least time
-- between two task.output events of a task (0.5 s, shared/webhook_output.py).
--
-- Every entry holds kind, attempt, data, and its attempt's running counts: seq (output entries
-- so far, this one included) and bytes (their data bytes). So the last entry alone says where
-- the stream stands, and the caps need no key of their own.
--
-- An attempt newer than the stream's (the last entry's) starts with a restart mark: an explicit
-- 'restart' is that mark; any other kind, when the stream holds an older attempt's entries, gets
-- one written first (data ''), so a redelivered task's output is never silently mixed with the
-- dead attempt's. The new attempt's counts start from 0.
--
-- An appended output of a task whose record subscribes to task.output (its webhook_events)
-- writes that event to the outbox in the same step, unless the task has one not sent yet
-- (output_state's `pending`): that one, read from the stream when it is sent (outbox_claim),
-- carries this chunk too. A new one is due at max(now, the last one's read + output_interval),
-- so a task sends at most one task.output per output_interval; none after a receiver's 410
-- (output_state's `stopped`, outbox_outcome).
--
-- Returns {outcome, id...}: 'appended' and the ids written (a restart mark's first); 'ended'
-- (the stream holds an error or done: nothing more is written); 'stale' (an older attempt than
-- the stream's, or a restart of the attempt already running: nothing written);
-- 'too_many_entries' or 'too_many_bytes' (this output would take its attempt past a cap:
-- nothing written, not even the restart mark; the caller fails the task).
--
-- Reads stream's last entry (XREVRANGE COUNT 1); for an appended output, record (webhook,
-- webhook_events) and output_state (pending, read_at, stopped) and whether K.event .. pending
-- still exists.
-- Writes stream (XADD; the restart mark and the event in one step) and its TTL (EXPIRE ttl);
-- for an output that starts a task.output event, the event (K.event .. its id, lib.lua
-- emit_output), its due entry (K.due) and output_state (seq, pending; max(ttl, MIN_EVENT_TTL)).
local key = KEYS[1]
local kind, attempt, data = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local max_entries, max_bytes, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local task_id, now, interval = ARGV[7], ARGV[8], tonumber(ARGV[9])

local current, seq, size, any = 0, 0, 0, false
local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
if last then
  local fields = {}
  for i = 1, #last[2], 2 do fields[last[2][i]] = last[2][i + 1] end
  if fields.kind == 'done' or fields.kind == 'error' then return {'ended'} end
  current, seq, size = tonumber(fields.attempt), tonumber(fields.seq), tonumber(fields.bytes)
  any = true
end
if attempt < current or (kind == 'restart' and attempt == current) then return {'stale'} end

local mark = kind == 'restart' or (any and attempt > current)
if mark then seq, size = 0, 0 end
if kind == 'output' then
  if seq + 1 > max_entries then return {'too_many_entries'} end
  if size + #data > max_bytes then return {'too_many_bytes'} end
end

local ids = {'appended'}
if mark then
  local mark_data = ''
  if kind == 'restart' then mark_data = data end
  table.insert(ids, redis.call('XADD', key, '*', 'kind', 'restart', 'attempt', attempt,
    'data', mark_data, 'seq', 0, 'bytes', 0))
end
if kind ~= 'restart' then
  if kind == 'output' then seq, size = seq + 1, size + #data end
  table.insert(ids, redis.call('XADD', key, '*', 'kind', kind, 'attempt', attempt,
    'data', data, 'seq', seq, 'bytes', size))
end
redis.call('EXPIRE', key, ttl)
if kind == 'output' then
  local hook = redis.call('HMGET', KEYS[2], 'webhook', 'webhook_events')
  if hook[1] and string.find(',' .. (hook[2] or '') .. ',', ',task.output,', 1, true) then
    local state = redis.call('HMGET', KEYS[3], 'pending', 'read_at', 'stopped')
    local waiting = state[1] and redis.call('EXISTS', K.event .. state[1]) == 1
    if not waiting and not state[3] then
      local due = math.max(tonumber(now), (tonumber(state[2]) or 0) + interval)
      emit_output(KEYS[3], task_id, hook[1], due, now, math.max(tonumber(ttl), MIN_EVENT_TTL))
    end
  end
end
return ids
