"""The OpenAI Batch API path for batch-tier items (issue 27, part 2).

collect.py (due items into batches of ours, stores round robin) -> submit.py (upload the input
file, create the batch, adopt one created before a crash) -> poll.py (status, cancel when no item
is wanted, the end of a batch) -> outcome.py (each output line checked like a real-time answer
and written through the engine's outcome rules). runner.py runs the steps on a timer, each
under its advisory lock; store.py holds the SQL calls (sql/batches.sql).

OpenAI-specific: wired from `listener.openai.openai_app` as an App service, so the engine never
imports it (pyproject's import contract).
"""
