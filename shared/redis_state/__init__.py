"""What Redis holds, who writes each key, and in which script.

Redis is the dispatcher's only state: Celery's broker lists (kombu's), and beside them the
dispatcher's own keys under `dispatch:`. Every change of that state that must be atomic is one
Lua script, run in one round trip; everything else is a single plain command.

Where to look:

- keys.py: every key and channel name, each with its type, writers, readers and TTL; its
  `KEY_LAYOUT` is the key layout table of docs/architecture.md.
- lua/: one file per script, each opening with its KEYS, ARGV, reply and what it reads and
  writes; lua/lib.lua holds the helpers every script shares (ending a task, the queue depth and
  batch counters, the webhook outbox, the finished channel).
- task_scripts.py, batch_scripts.py, outbox_scripts.py: one typed Python call per script, the
  only code that knows its argument layout.
- record.py: the task record's fields, how Python writes and reads them, stored answers, and
  the idempotency record; batch.py: the batch hash; published.py: the finished channel's
  messages; loader.py: how a script's source is put together.

Who writes what, in short: the API's submit (task_submit, or batch_create + batch_add_items)
writes a task's record, its claim-checked payload, its idempotency key, its queue's depth
counter and its Celery message together. A worker's task_start and task_finish, the API's
task_cancel, batch_cancel_items and task_settle (a read settling a task that can no longer end
by itself) move it on; each of them keeps the depth counters and the batch's counters, writes
the task's webhook event into the outbox, deletes its payload once it ends and publishes the
ended record. The webhook consumers run the outbox_* scripts on the outbox alone.
"""
