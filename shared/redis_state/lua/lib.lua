-- lib.lua: the helpers the scripts share. The loader (shared/redis_state/loader.py) runs each
-- script as one source: the definitions of keys.py it uses (K, QUEUE_OF, PUBLISH_INLINE_BYTES,
-- MIN_EVENT_TTL), the helpers below it calls (with the ones they call), then the script. So a
-- helper is one block, its comment right above it, with no blank line inside, and it comes after
-- the helpers it calls. Line numbers in a script's error messages count from the start of the
-- source the loader built (loader.source).
--
-- Every task transition goes through end_task (a task ends) or moved (it changes status), so
-- the queue depth counters, the batch counters, the webhook outbox, the claim-checked payload,
-- the index of open tasks and the finished channel are kept in one place, in the same atomic
-- step as the record.

-- The id held in an idempotency record "<fingerprint>:<id>" (record.py writes it).
local function held_id(held)
  local _, colon = string.find(held, ':', 1, true)
  return string.sub(held, colon + 1)
end

-- An error body (JSON without task_id) with the task's id in it.
local function with_task_id(error, task_id)
  local body = cjson.decode(error)
  body['task_id'] = task_id
  return cjson.encode(body)
end

-- Writes the webhook event `event_type` of the hash `key` (a task record or a batch) to the
-- outbox, when the hash has a webhook subscribed to that type: the event hash (its id, type,
-- time, URL and a snapshot of `key`, taken after `webhook_event` names it) and its entry in the
-- due set. The event id follows from the subject's id and `suffix`: one subject emits each type
-- at most once, so it is unique without a random source (which scripts do not have) and stable
-- for every retry of that event.
local function emit_event(key, subject_id, event_type, suffix, now, ttl)
  local hook = redis.call('HMGET', key, 'webhook', 'webhook_events')
  if not hook[1] then return end
  if not string.find(',' .. (hook[2] or '') .. ',', ',' .. event_type .. ',', 1, true) then
    return
  end
  local id = 'msg_' .. (string.gsub(subject_id, '-', '')) .. '_' .. suffix
  local event = K.event .. id
  redis.call('HSET', key, 'webhook_event', id)
  redis.call('HSET', event, 'task_id', subject_id, 'type', event_type, 'at', now,
    'url', hook[1], 'record', cjson.encode(redis.call('HGETALL', key)), 'state', 'pending',
    'attempts', 0, 'round', 0, 'ticket', 0)
  redis.call('EXPIRE', event, math.max(tonumber(ttl), MIN_EVENT_TTL))
  redis.call('ZADD', K.due, now, id)
end

-- The task of record `key` moved into `status`: its task.* event (task.started for running).
local function emit_webhook(key, task_id, status, now, ttl)
  local kind = status
  if status == 'running' then kind = 'started' end
  emit_event(key, task_id, 'task.' .. kind, kind, now, ttl)
end

-- Adds `by` to the field `field` of the console's figures (shared/redis_state/figures.py) for
-- the time `now`: one hash per FIGURES_BUCKET seconds, kept FIGURES_TTL seconds, so the figures
-- take memory by time, not by tasks, and every API process and worker adds to the same ones.
local function count_figure(now, field, by)
  local start = math.floor(tonumber(now) / FIGURES_BUCKET) * FIGURES_BUCKET
  local key = K.figures .. string.format('%d', start)
  -- A bucket is written only during its own FIGURES_BUCKET seconds and FIGURES_TTL covers the
  -- chart's window from then, so its TTL is set by the first write of each field, not by all.
  if redis.call('HINCRBY', key, field, by) == by then redis.call('EXPIRE', key, FIGURES_TTL) end
end

-- Counts a duration of `seconds` into the histogram `name` ('wait:<priority>', ...) of the
-- figures at `now`: field '<name>:<bin>', the bin being the first of FIGURE_EDGES it is at most
-- (#FIGURE_EDGES: above them all).
local function count_duration(now, name, seconds)
  local bin = #FIGURE_EDGES
  for i, edge in ipairs(FIGURE_EDGES) do
    if seconds <= edge then
      bin = i - 1
      break
    end
  end
  count_figure(now, name .. ':' .. bin, 1)
end

-- The ended task of record `key` (from `old` into `new` at `now`) in the figures: its ending by
-- class, a failure's code, its run time and end-to-end time (succeeded and failed alike, once it
-- ran), its backend's run time; and a failure joins the list of recent ones.
local function count_ending(key, task_id, old, new, now)
  local f = redis.call('HMGET', key, 'priority', 'created_at', 'started_at', 'backend', 'error')
  local class, t = f[1] or 'default', tonumber(now)
  count_figure(now, 'ended:' .. class .. ':' .. new, 1)
  if new == 'failed' or new == 'expired' then
    local ok, body = pcall(cjson.decode, f[5] or '')
    local code = 'unknown'
    if ok and type(body) == 'table' and type(body.code) == 'string' then code = body.code end
    count_figure(now, 'code:' .. class .. ':' .. code, 1)
    redis.call('LPUSH', K.recent_failed, task_id)
    redis.call('LTRIM', K.recent_failed, 0, RECENT_LIMIT - 1)
  end
  if old == 'running' and f[3] and (new == 'succeeded' or new == 'failed') then
    count_duration(now, 'run:' .. class, t - tonumber(f[3]))
    count_duration(now, 'backend:' .. (f[4] or 'torchserve'), t - tonumber(f[3]))
    count_duration(now, 'e2e:' .. class, t - tonumber(f[2]))
  end
end

-- The task of record `key` moved out of status `old`: when that was `queued`, its class's
-- counter goes down. A task leaves `queued` exactly once, whichever script moves it.
local function left_queue(key, old)
  if old ~= 'queued' then return end
  redis.call('DECR', K.queued .. QUEUE_OF[redis.call('HGET', key, 'priority')])
end

-- The batch's last item ended: the batch ends (`canceled` after a DELETE), keeps RESULT_TTL
-- (its `ttl` field), emits batch.completed and publishes its hash to every waiter.
local function end_batch(bkey, batch, now)
  local status = 'completed'
  if redis.call('HGET', bkey, 'cancel_requested_at') then status = 'canceled' end
  redis.call('HSET', bkey, 'status', status, 'finished_at', now)
  redis.call('ZREM', K.open_batches, batch)
  local ttl = tonumber(redis.call('HGET', bkey, 'ttl'))
  redis.call('EXPIRE', bkey, ttl)
  emit_event(bkey, batch, 'batch.completed', 'batch_completed', now, ttl)
  redis.call('PUBLISH', K.finished, cjson.encode({batch, redis.call('HGETALL', bkey)}))
end

-- Keeps the batch counters of the task of record `key` (a no-op outside batches). An item that
-- ended keeps its record as long as its batch, so results stay readable as long as the batch
-- is; the last item to end ends the batch.
local function batch_move(key, old, new, now)
  local batch = redis.call('HGET', key, 'batch')
  if not batch or old == new then return end
  local bkey = K.batch .. batch
  if redis.call('EXISTS', bkey) == 0 then return end
  redis.call('HINCRBY', bkey, old, -1)
  redis.call('HINCRBY', bkey, new, 1)
  if new == 'running' then return end
  local left = redis.call('TTL', bkey)
  if left > redis.call('TTL', key) then redis.call('EXPIRE', key, left) end
  local ended = redis.call('HINCRBY', bkey, 'ended', 1)
  if ended == tonumber(redis.call('HGET', bkey, 'total')) then end_batch(bkey, batch, now) end
end

-- The task of record `key` moved from `old` to `new`: the class's counter of running tasks
-- follows (a redelivery, running to running, leaves it as it is).
local function moved(key, old, new, now)
  left_queue(key, old)
  if old ~= new and (old == 'running' or new == 'running') then
    local running = K.running .. QUEUE_OF[redis.call('HGET', key, 'priority')]
    if new == 'running' then redis.call('INCR', running) else redis.call('DECR', running) end
  end
  batch_move(key, old, new, now)
end

-- Publishes the ended task's whole record, so waiters need no read after the wake-up; a big
-- result is left out (the id alone), so each API process does not receive every large answer:
-- the one waiting for it reads it. Every ending passes here, so this is also where the task's
-- claim-checked payload goes: deleted, or, when the task ended failed, expired or canceled and
-- its record has a `retry_keep` (RETRY_KEEP_SECONDS, record.py), kept min(retry_keep, the
-- record's TTL) seconds for POST /tasks/{id}/retry (api/retry.py). Its key follows from the id
-- rather than being passed in KEYS, which is fine on the single Redis used here.
local function publish_record(key, task_id)
  local f = redis.call('HMGET', key, 'status', 'retry_keep')
  local keep = tonumber(f[2] or '0') or 0
  if keep > 0 and (f[1] == 'failed' or f[1] == 'expired' or f[1] == 'canceled') then
    redis.call('EXPIRE', K.payload .. task_id, math.min(keep, math.max(redis.call('TTL', key), 1)))
  else
    redis.call('DEL', K.payload .. task_id)
  end
  if redis.call('HSTRLEN', key, 'result') > PUBLISH_INLINE_BYTES then
    redis.call('PUBLISH', K.finished, cjson.encode({task_id}))
  else
    redis.call('PUBLISH', K.finished, cjson.encode({task_id, redis.call('HGETALL', key)}))
  end
end

-- The streamed task of record `key` ended in `status`: its stream (created if it has none yet,
-- e.g. a task canceled while queued) ends with `error` (a failed or expired task: its error
-- body) or `done` (succeeded or canceled; data '': the API sends the final task view, read
-- from the record, which this same step ended). The entry carries the last attempt and counts, as stream_append's entries do, and
-- after it stream_append writes nothing more: a worker still running a canceled task learns it
-- at its next chunk and closes its upstream call. The stream then lives as long as the record.
local function end_stream(key, task_id, status)
  if redis.call('HGET', key, 'stream') ~= '1' then return end
  local skey = K.stream .. task_id
  local attempt, seq, size = redis.call('HGET', key, 'deliveries') or '0', '0', '0'
  local last = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', 1)[1]
  if last then
    local fields = {}
    for i = 1, #last[2], 2 do fields[last[2][i]] = last[2][i + 1] end
    if fields.kind == 'done' or fields.kind == 'error' then return end
    attempt, seq, size = fields.attempt, fields.seq, fields.bytes
  end
  local kind, data = 'done', ''
  local error = redis.call('HGET', key, 'error')
  if error and (status == 'failed' or status == 'expired') then kind, data = 'error', error end
  redis.call('XADD', skey, '*', 'kind', kind, 'attempt', attempt, 'data', data, 'seq', seq,
    'bytes', size)
  redis.call('EXPIRE', skey, redis.call('TTL', key))
end

-- The ended task of record `key` leaves the index of open tasks (K.open), and the copy of its
-- message (K.message, written by task_submit and batch_add_items for worker/reconciler.py)
-- counts one open task less: it is deleted with its last one, unless one of its tasks ended
-- failed, expired or canceled with a `retry_keep` (see publish_record): the copy then holds
-- that task's request for POST /tasks/{id}/retry, so it is kept until `kept_until` (epoch
-- seconds: the latest such ending plus min(retry_keep, its record's TTL)) and expires then.
-- A copy marked `secret` (one of its tasks carried per-request credentials, record.py) is never
-- kept: one message carries several submits, and their credentials must not outlive them.
local function close_task(key, task_id)
  redis.call('ZREM', K.open, task_id)
  local f = redis.call('HMGET', key, 'message', 'status', 'retry_keep', 'finished_at')
  if not f[1] or f[1] == '' then return end
  local mkey = K.message .. f[1]
  if redis.call('EXISTS', mkey) == 0 then return end
  local keep, now = tonumber(f[3] or '0') or 0, tonumber(f[4] or '0') or 0
  if keep > 0 and (f[2] == 'failed' or f[2] == 'expired' or f[2] == 'canceled')
    and redis.call('HGET', mkey, 'secret') ~= '1' then
    local want = math.min(keep, math.max(redis.call('TTL', key), 1))
    if redis.call('TTL', mkey) < want then redis.call('EXPIRE', mkey, want) end
    local held = tonumber(redis.call('HGET', mkey, 'kept_until') or '0') or 0
    if now + want > held then
      redis.call('HSET', mkey, 'kept_until', string.format('%.3f', now + want))
    end
  end
  if redis.call('HINCRBY', mkey, 'open', -1) > 0 then return end
  local kept = tonumber(redis.call('HGET', mkey, 'kept_until') or '0') or 0
  if kept - now >= 0.5 then
    redis.call('EXPIRE', mkey, math.floor(kept - now + 0.5))
  else
    redis.call('DEL', mkey)
  end
end

-- The task of record `key` ends: from `old` into the terminal status `new` at `now`, with the
-- fields that follow `ttl` (name, value, ...: its result or error), kept `ttl` seconds. Its
-- counters, webhook event, stream, payload and publish follow from here, in every script that
-- ends one.
local function end_task(key, task_id, old, new, now, ttl, ...)
  redis.call('HSET', key, 'status', new, 'finished_at', now, ...)
  redis.call('EXPIRE', key, ttl)
  moved(key, old, new, now)
  count_ending(key, task_id, old, new, now)
  emit_webhook(key, task_id, new, now, ttl)
  end_stream(key, task_id, new)
  close_task(key, task_id)
  publish_record(key, task_id)
end

-- Cancels the queued task of record `key`: `error` is its error body (JSON with its task_id).
-- task_cancel and batch_cancel_items both cancel through here.
local function cancel_queued(key, task_id, now, ttl, error)
  end_task(key, task_id, 'queued', 'canceled', now, ttl, 'error', error)
end

-- Writes the next task.output event of task `task_id` to the outbox, due at `due`: the event
-- hash without its outputs (outbox_claim reads them in when it is sent, read_outputs) and its
-- entry in the due set. `okey` is the task's coalescing hash (K.output .. task_id): the event
-- is its `pending` one until read, so the chunks that come meanwhile go out in it. Its id is
-- the task's and the event's number (`seq`, from 1): unique and stable for every retry, like
-- emit_event's. `ttl`: the event's and okey's, at least MIN_EVENT_TTL already.
local function emit_output(okey, task_id, url, due, now, ttl)
  local seq = redis.call('HINCRBY', okey, 'seq', 1)
  local id = 'msg_' .. (string.gsub(task_id, '-', '')) .. '_output_' .. seq
  local event = K.event .. id
  redis.call('HSET', event, 'task_id', task_id, 'type', 'task.output', 'at', now, 'url', url,
    'seq', seq, 'state', 'pending', 'attempts', 0, 'round', 0, 'ticket', 0)
  redis.call('EXPIRE', event, ttl)
  redis.call('ZADD', K.due, string.format('%.17g', due), id)
  redis.call('HSET', okey, 'pending', id, 'ttl', ttl)
  redis.call('EXPIRE', okey, ttl)
end

-- outbox_claim's first claim of the task.output event `event` (id `event_id`): reads into it
-- the task's stream entries after the previous task.output's (okey's `upto`; the first starts
-- after 0-0): output chunks and restart marks, in order, at most `max_entries` of them and
-- `max_bytes` of data (one at least), up to the stream's error or done (which the terminal
-- event carries). It writes `outputs` (JSON [[id, kind, attempt, data], ...]), `from`,
-- `last_event_id` (the last entry read; `from` when none), `status` (the task's; '' once its
-- record expired), `final` ('1': the stream's end was reached, no task.output follows) and
-- `at` (`now`, the caller's text), so every retry sends the same outputs. The task then has no
-- pending task.output: its next chunk starts one due `interval` s after this read at the
-- earliest (stream_append); entries a cap left out start one here, due then.
local function read_outputs(event, event_id, now, interval, max_entries, max_bytes)
  local task_id = redis.call('HGET', event, 'task_id')
  local okey = K.output .. task_id
  local from = redis.call('HGET', okey, 'upto') or '0-0'
  local entries = redis.call('XRANGE', K.stream .. task_id, '(' .. from, '+', 'COUNT',
    max_entries + 1)
  local items, size, last, more, final = {}, 0, from, false, false
  for _, entry in ipairs(entries) do
    local fields = {}
    for i = 1, #entry[2], 2 do fields[entry[2][i]] = entry[2][i + 1] end
    if fields.kind == 'done' or fields.kind == 'error' then
      final = true
      break
    end
    if #items == max_entries or (#items > 0 and size + #fields.data > max_bytes) then
      more = true
      break
    end
    table.insert(items, {entry[1], fields.kind, tonumber(fields.attempt), fields.data})
    size, last = size + #fields.data, entry[1]
  end
  local outputs = '[]'
  if #items > 0 then outputs = cjson.encode(items) end
  local final_flag = '0'
  if final then final_flag = '1' end
  redis.call('HSET', event, 'outputs', outputs, 'from', from, 'last_event_id', last,
    'status', redis.call('HGET', K.task .. task_id, 'status') or '', 'final', final_flag,
    'at', now)
  redis.call('HSET', okey, 'upto', last, 'read_at', now)
  if redis.call('HGET', okey, 'pending') == event_id then redis.call('HDEL', okey, 'pending') end
  if more and not redis.call('HGET', okey, 'stopped') then
    local ttl = tonumber(redis.call('HGET', okey, 'ttl')) or MIN_EVENT_TTL
    emit_output(okey, task_id, redis.call('HGET', event, 'url'), tonumber(now) + interval, now,
      ttl)
  end
end
