"""Prefect plumbing: the local service, task runners, settings resolution, publishing, the Dask worker
preload and every use of Prefect's private API (compat) (see docs/architecture.md)."""
