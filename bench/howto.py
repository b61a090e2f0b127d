"""The "How measured" section of bench/RESULTS.md."""

HOW_MEASURED = """\
Everything runs on this one machine: Ferry's processes (`python -m shared.cli fake-provider |
migrate | api | worker | sweeper`, exactly what `ferry …` runs) with their own
`FERRY_NAMESPACE=bench-<pid>` and database `ferry_bench` (dropped and recreated each run),
`ANTHROPIC_BASE_URL` pointing at the fake provider, `FERRY_LOG_LEVEL=warning`; RabbitMQ and
PostgreSQL are the machine's own and shared with anything else running. Load generators,
Ferry, the fake provider, RabbitMQ and PostgreSQL all compete for the same cores, so every
latency row says where the CPU went during the run (per process, from `/proc`; `other` is
load on the machine that is not the bench's).

**Load generators** (`bench/loadgen.py`) are separate Python processes on uvloop (plain
requests through `bench/lean.py`, a minimal keep-alive HTTP/1.1 client that costs a third of
aiohttp's client per request; streams through aiohttp's client; one process per 400 RPS of
schedule, two for closed loops), started together on a shared wall-clock start
time, their HdrHistograms (µs, 3 significant digits) added exactly. Between runs the bench
waits until its own processes are idle (an overloaded target may still be draining its queue)
and empties the fake provider's call log.
- *Open loop* (latency at a fixed rate): request *i* is due at `start + i/rate`, sent then
  whether or not earlier ones have answered, and its latency is measured **from that intended
  time**. A stall therefore shows up with its full queueing delay in every request it held up
  (the coordinated-omission correction wrk2 makes). Requests due in the warm-up are sent but not
  recorded. *achieved* is completed requests / (last completion − first intended send); when
  it falls short of the target rate, the target was past saturation and the latencies grow
  with the length of the run. The generators also record their own lag (actual − intended send
  time; printed on stderr) to show the schedule was kept.
- *Closed loop* (maximum rate): N connections, each sending its next request when the last
  answered (a refused one waits the `retry-after` it was given first, as the SDKs do; asking
  again at once would measure how fast Ferry refuses); *achieved* is completed requests in
  the measured window / window. Its latencies are
  from the actual send and describe that concurrency, not a rate. These runs use `wrk` (C,
  2 threads; percentiles from wrk's own histogram) when it is installed: a Python client spends
  more CPU per request than a small aiohttp server does, so it would measure itself rather than
  the server (the row's load column names the driver). Submitting a fixed number of jobs
  (scenario 4) always uses the Python generator.
- Only responses with the expected status (200) are recorded in latency; anything else is
  counted under *errors* by status or exception.

**Scenarios**
1. *Sync*: `POST /anthropic/v1/messages` (small prompt, `max_tokens` 64) through Ferry (api →
   RabbitMQ → worker → fake provider and back) vs the same body straight to the fake provider's
   `POST /v1/messages`, open loop at 100, 300 and 1000 RPS, then closed loop with 64
   connections. Between them, at every rate and in the closed loop, the floor of the
   design (`bench/floor.py`): an aiohttp front that publishes the body to a classic queue and
   a relay process that POSTs it to the fake provider and publishes the answer back, with
   Ferry's libraries and nothing else (no auth, validation, admission, history, metrics).
   *compare* on Ferry's row: Ferry − direct at p50/p99 (the added ms), and of that the broker
   hop's part (floor − direct); Ferry − floor is what Ferry's own code adds. Then
   overload: Ferry alone, open loop at 3× its closed-loop maximum of the same run; goodput
   (200s/s) as a share of that maximum, the 200s' p50/p99, and the 529s' count and p50/p99
   from intended send time (how quickly the excess is refused).
2. *Streaming*: `"stream": true`, the fake provider answers in 20 text deltas (about 27 SSE
   events) with no delay between them; time to the first `event:` line and to the end of the
   stream (a stream without `message_stop` counts as an error), open loop at 50 RPS.
3. *Async submit*: `x-bf-async: true` submits (insert job row, publish to the quorum queue,
   wait for the broker's confirm, commit) with no worker running, closed loop 64 connections
   and open loop 200 RPS; the ceiling is `bench/bare.py`, one aiohttp process that reads the
   body and answers a small JSON, served with the same runner options as Ferry's api.
4. *Async jobs*: timings from the `jobs` table (PostgreSQL `now()` at submit, claim and
   finish). *Queue drained*: N jobs queued with no worker, then 1 or 2 workers started;
   jobs/s = N / (last `completed_at` − first `started_at`), so process start-up is excluded.
   *Submitted while running*: workers already up; N / (last `completed_at` − first
   `submitted_at`). *In flight*: 10,000 jobs (`--quick` 2,000) with `[[fake:delay=5]]`,
   queued first, then 2 workers with `FERRY_WORKER_CONCURRENCY` = half the jobs each; total =
   last `completed_at` − first `started_at` (5 s would be perfect), the peak number of jobs
   between `started_at` and `completed_at` at one instant, and each worker's `VmHWM`.
5. *Sweeper*: N finished jobs whose results expired an hour ago inserted with one
   `INSERT … SELECT generate_series` (then `ANALYZE`); `ferry sweeper` started with
   `FERRY_SWEEP_INTERVAL=1`; rows/s = N / (spawn → `job_results` empty, polled every 0.25 s).
   Async submit latency at 100 RPS open loop is measured before the sweeper starts and while
   it runs (the row says how much of the window the sweep covered).
6. *Faults* (`--only faults`): runs `pytest tests/faults -m faults` (its own stacks, on a
   private PostgreSQL cluster and RabbitMQ node; about 3 minutes) and reports each fault's
   summary line: async jobs acknowledged (200), completed, lost (acknowledged, never
   completed), upstream calls beyond one per job, and the time from the fault's end to the
   first acknowledged submit; for the broker faults, how many waiting sync/stream requests
   were answered with the envelope, and after how long. docs/durability.md says what each
   fault exercises.
7. *Long-poll* (`--only longpoll`): 10,000 jobs queued with no worker, then one poll each with
   `x-ferry-wait: 60` held open on the one api process; memory per waiting poll = (api VmRSS
   with every poll waiting, by its `ferry_long_polls_waiting` gauge, − before) / polls; then 2
   workers start and each poll's answer time (client clock) − its job's `completed_at`.
8. *Batches* (`--only batches`): 200 single async jobs and 200 sync requests, each at 20/s,
   on idle workers; one batch of 100,000 small requests created with no worker running
   (client time to the answer; api VmHWM, reset through `/proc/PID/clear_refs` just before,
   minus VmRSS then); 2 workers started, the same single jobs and sync requests sent meanwhile
   (async: `completed_at − submitted_at`; sync: client send to answer; against the idle run:
   the batch's own lane at work); requests/s from the jobs table; the results JSONL read back;
   then one create of ~250 MB (100,000 requests of 2.5 KB), time and api peak memory,
   canceled afterwards.
9. *Peer* (`--peer litellm`): LiteLLM's proxy (`litellm --config … --num_workers 2`, in
   `bench/.peer-venv`) with one model mapped to `anthropic/<model>` at the fake provider, a
   master key (it refuses to start without one) and no database; scenarios 1 and 2 are run
   against its `POST /v1/messages` with the same bodies. Ratios are Ferry / LiteLLM (< 1:
   Ferry is faster / lower).

10. *Pacing* (`--only pacing`): the fake provider limits each key (`POST /_fake/config`, a
   token bucket holding 1 s of its rate, 429 + `retry-after` past it, the limit per minute in
   Anthropic's headers); the learned pacing state is deleted before each row (a cold start);
   1,200 async jobs (`--quick` 400) submitted at once over 64 connections, with workers
   running; time = last `completed_at` − first `submitted_at`, against N / R; the 429 share is
   the fake provider's own count of calls by key and status. Rows: 2 workers with
   `FERRY_PACING=off` (each worker honours only its own 429s: the before), then 2 and 4
   workers on one key at 40 req/s, and on two keys at 30 + 10 req/s.
11. *Capacity* (`--only capacity`): 20,000 durable submits (`--quick` 4,000) with no worker,
   then the same jobs drained by 2 workers, then 10 s of closed-loop sync requests; for each
   phase the CPU ticks of every process group (api, workers, RabbitMQ, PostgreSQL) over the
   phase divided by the requests it completed; WAL from `pg_stat_wal.wal_bytes` (the whole
   cluster) before and after; bytes per job from `pg_total_relation_size` of the job tables.
   The projection rows multiply the CPU per job by a target rate at 70 % utilisation
   (docs/scaling.md reads them).

`--profile` samples the api with py-spy (200 Hz, non-blocking) during the saturation runs of
scenarios 1 and 3 and adds where its CPU went, by library and by function.
"""
