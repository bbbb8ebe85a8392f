"""Names of the DynamoDB key schema and indexes, shared by the adapter, provision.py and the CDK stack.

One table holds everything, keyed by a string `pk`:
  task#<id>        one item per task
  counter#tasks    per-status counters and the submit sequence (updated in the same transaction as
                   every status transition, so counts are read with one GetItem)
  meta#<key>       put_meta / get_meta
  workers#beats    every worker's latest heartbeat, in one map attribute `beats`
  idem#<key>       the task submitted under an Idempotency-Key (written in the task's create
                   transaction, so a key maps to one task; expires with it)

Two sparse GSIs keep per-request reads bounded without a Scan:
  queued_by_seq     only queued tasks carry `qpart`; one Query qpart="q" lists them in queue order,
                    which gives the positions of any number of ids (bounded by ACESTEP_QUEUE_MAXSIZE)
  finished_by_time  only finished tasks that ran carry `fpart`; Query newest-first with Limit gives
                    the ids for recent_finished (reads `limit` items)
  webhooks_due      the webhook outbox: only a finished task whose webhook is still to be delivered
                    carries `wpart` (set in the write that ends it, removed once delivered or given
                    up); Query wpart="w" AND wdue <= now lists what is due, earliest first
  unsent_by_time    a queued task whose SQS message is not known to be sent carries `upart` from its
                    create until the intake's send is confirmed; Query upart="u" AND usince <= cutoff
                    lists the ghosts a submitter that died between the two writes left (ghosts.py)
"""
PK = "pk"
TTL_ATTR = "expires_at"

QUEUED_INDEX = "queued_by_seq"
QUEUED_PART = "qpart"
QUEUED_SORT = "seq"

FINISHED_INDEX = "finished_by_time"
FINISHED_PART = "fpart"
FINISHED_SORT = "finished_at"
DURATION_ATTR = "duration"

WEBHOOK_INDEX = "webhooks_due"
WEBHOOK_PART = "wpart"
WEBHOOK_DUE = "wdue"
WEBHOOK_ATTEMPTS = "wattempts"

UNSENT_INDEX = "unsent_by_time"
UNSENT_PART = "upart"
UNSENT_SINCE = "usince"

TASK_PREFIX = "task#"
META_PREFIX = "meta#"
IDEMPOTENCY_PREFIX = "idem#"
COUNTER_KEY = "counter#tasks"
OWNER_PREFIX = "owner#"  # one counter item per caller: queued, running, active (ACESTEP_CALLER_MAX_*)
WORKERS_KEY = "workers#beats"
