"""`prefect deploy` for usseg: the Prefect CLI with one client fix, run by `usseg up`.

    python deployments/deploy.py --all --prefect-file deployments/prefect.yaml   (from the repository root)

Why the fix: with the pinned fastapi/pydantic, Prefect 3.8's server rejects the explicit ``null``
offset/limit that ``PrefectClient.read_workers_for_work_pool`` sends (HTTP 422 "Input should be a valid
integer"), and `prefect deploy` calls it after creating each deployment, so a plain
`prefect deploy --all` stops after the first one. Sending the server's own defaults avoids it; nothing
else changes. Remove this wrapper when Prefect sends no nulls there.
"""
from __future__ import annotations

import sys

from prefect.client.orchestration import PrefectClient

_read_workers = PrefectClient.read_workers_for_work_pool


async def _read_workers_with_defaults(self, work_pool_name, worker_filter=None, offset=None, limit=None):
    return await _read_workers(self, work_pool_name, worker_filter=worker_filter,
                               offset=0 if offset is None else offset, limit=200 if limit is None else limit)


def main(argv: list[str]) -> None:
    PrefectClient.read_workers_for_work_pool = _read_workers_with_defaults
    from prefect.cli import app

    sys.argv = ["prefect", "--no-prompt", "deploy", *argv]
    app()


if __name__ == "__main__":
    main(sys.argv[1:])
