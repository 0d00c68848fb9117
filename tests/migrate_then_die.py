"""`python tests/migrate_then_die.py CONNINFO N`: run `migrate up` and SIGKILL this very process
at the N-th step: right after a statement has run (before its transaction commits) or right after
a migration is complete, counted over every migration's `up` block. A real crash, as a deploy's
killed container has."""

from __future__ import annotations

import os
import signal
import sys

from listener.migrate import Migration, MigrationRunner


def main() -> None:
    conninfo, kill_after = sys.argv[1], int(sys.argv[2])
    ran = 0

    def count(_migration: Migration, _number: int | None) -> None:
        nonlocal ran
        ran += 1
        if ran == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    MigrationRunner(conninfo, output=lambda _line: None, after_statement=count).up()
    sys.exit(f"ran {ran} step(s) and was never killed")


if __name__ == "__main__":
    main()
