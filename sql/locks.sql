-- `listener migrate up --plan`: the relation locks one backend holds or waits for
-- (results.lockinfo reads its own backend's; a statement that cannot run in a transaction is
-- watched from outside).

-- backend_locks --
SELECT l.locktype, l.mode, c.relname, n.nspname, c.relkind::text
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.pid = %(pid)s AND l.locktype = 'relation'
  AND n.nspname NOT IN ('pg_catalog', 'pg_toast', 'information_schema')
ORDER BY c.relname, l.mode;

-- backend_waiting --
-- True once the backend waits (a lock, or the snapshot wait of a concurrent index build).
SELECT wait_event_type IN ('Lock', 'IPC') OR state = 'idle'
FROM pg_stat_activity
WHERE pid = %(pid)s;

-- public_tables --
SELECT c.relname FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = 'public'
ORDER BY c.relname;
