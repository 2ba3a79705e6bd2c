"""The CLI, experiment config, stage records and Prefect flows.

Set here, before any flow module imports Prefect: a Prefect API that stops answering
(a server restart, a short outage) is retried for about two minutes (2 + 4 + ... + 64 s
of Prefect's exponential backoff: 6 retries) before a call fails, instead of Prefect's
default of about one (5 retries); a user's own setting wins (issue 25: a 90 s outage
must not fail a run)."""

import os

os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "6")
