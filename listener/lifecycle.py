"""Cancel and retry a job or a store's jobs: what `listener cancel` and `listener retry` run.

The work is done by SQL functions (`listener_cancel_job`, `listener_retry_job`, …), so an app in
any language gets the same guarantees with one `SELECT`; this module calls them and turns their
JSON answer into a sentence for the operator.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors

from listener.db import wrap
from listener.errors import ListenerError
from listener.sqlfiles import queries


class NoSuchJob(ListenerError):
    """The job id names no job."""


def _call(conninfo: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute(queries("lifecycle")[name], params).fetchone()
    except errors.NoDataFound as error:
        raise NoSuchJob(str(error.diag.message_primary or error)) from None
    except psycopg.Error as error:
        raise wrap(error, f"{name.replace('_', ' ')} failed") from error
    assert row is not None
    answer: dict[str, Any] = row[0]
    return answer


async def call_async(
    conn: psycopg.AsyncConnection[Any], name: str, params: dict[str, Any]
) -> dict[str, Any]:
    """The same calls on an open async connection (the HTTP app's pool): `name` is
    `cancel_job`, `cancel_store`, `retry_job` or `retry_store`."""
    try:
        cursor = await conn.execute(queries("lifecycle")[name], params)
        row = await cursor.fetchone()
    except errors.NoDataFound as error:
        raise NoSuchJob(str(error.diag.message_primary or error)) from None
    except psycopg.Error as error:
        raise wrap(error, f"{name.replace('_', ' ')} failed") from error
    assert row is not None
    answer: dict[str, Any] = row[0]
    return answer


def cancel_job(conninfo: str, job_id: int) -> dict[str, Any]:
    return _call(conninfo, "cancel_job", {"job_id": job_id})


def cancel_store(conninfo: str, store: str) -> dict[str, Any]:
    return _call(conninfo, "cancel_store", {"instance_id": store})


def retry_job(conninfo: str, job_id: int) -> dict[str, Any]:
    return _call(conninfo, "retry_job", {"job_id": job_id})


def retry_store(conninfo: str, store: str) -> dict[str, Any]:
    return _call(conninfo, "retry_store", {"instance_id": store})


def describe_cancel(answer: dict[str, Any]) -> str:
    if "job_id" not in answer:
        if not answer["changed"]:
            return f"store {answer['instance_id']}: no unfinished job, nothing changed"
        return (
            f"store {answer['instance_id']}: {answer['jobs']} job(s) cancelled, "
            f"{answer['cancelled']} pending item(s) cancelled, "
            f"{answer['in_flight']} in flight will finish"
        )
    job = f"job {answer['job_id']}"
    if answer["finished"] and not answer["changed"]:
        return f"{job} had already ended ({answer['status']}): nothing changed"
    if not answer["changed"]:
        return f"{job} was already cancelled; {answer['in_flight']} item(s) still finishing"
    tail = (
        "the job has ended"
        if answer["finished"]
        else f"{answer['in_flight']} item(s) in flight will finish, then the job ends"
    )
    return f"{job} cancelled: {answer['cancelled']} pending item(s) cancelled; {tail}"


def describe_retry(answer: dict[str, Any]) -> str:
    if "job_id" not in answer:
        if not answer["changed"]:
            return f"store {answer['instance_id']}: no FAILED item, nothing changed"
        return (
            f"store {answer['instance_id']}: {answer['retried']} FAILED item(s) of "
            f"{answer['jobs']} job(s) back to PENDING"
        )
    job = f"job {answer['job_id']}"
    if answer["status"] == "CANCELLED":
        return f"{job} was cancelled: nothing retried"
    if not answer["changed"]:
        return f"{job} has no FAILED item ({answer['status']}): nothing changed"
    return f"{job}: {answer['retried']} FAILED item(s) back to PENDING, the job is PROCESSING"
