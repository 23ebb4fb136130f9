"""Workers: one dnsgate spread over several processes, one TUN queue each (``[engine] workers = N``).

The kernel steers every flow to one queue of a multi-queue TUN, so each worker process runs a whole,
ordinary Engine for the flows it is given. What the workers must share is what DNS taught them: a client
resolves through one worker and may open its connection through another. :mod:`engine.workers.answer_log`
is the shared-memory ring every worker publishes its DNS answers in; :mod:`engine.workers.sharing` replays
the other workers' answers through a worker's own hooks before it judges a new flow (docs/architecture.md
§12, "Workers: DNS first across processes"). :mod:`engine.workers.merge` turns the workers' control
answers into one engine's (docs/control.md).
"""
