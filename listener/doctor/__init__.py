"""`listener doctor`: checks split by concern (schema, backlog, connections, fleet), the report
(`report.py`, pure) and the command (`run.py`). Every query is in `sql/doctor.sql` and runs in a
read-only session."""

from listener.doctor.run import register, run_checks

__all__ = ["register", "run_checks"]
