-- taskcast schema for public.image_tasks.
--
-- Idempotent: safe to run any number of times, on a fresh database or on an existing
-- Supabase table. Apply it with `taskcast migrate` (one transaction, advisory lock, prints
-- what changed) or paste it into the Supabase SQL editor.
--
-- Deliberately absent, unlike the original deployment guide:
--   * no public.execute_sql(): a SECURITY DEFINER function that runs any SQL is callable by
--     anyone through Supabase's REST API (/rest/v1/rpc/execute_sql). If you created it,
--     drop it: DROP FUNCTION IF EXISTS public.execute_sql(text);
--   * no pg_reload_conf(): not needed, and not permitted on Supabase.

-- A table created here gets row level security at once: Supabase grants anon (the key
-- every browser holds) and authenticated privileges on new tables in public, so without
-- RLS anyone could read and change every task through /rest/v1/image_tasks. With RLS on
-- and no policy they see nothing until the app adds its own policies; taskcast, connecting
-- as the table's owner (on Supabase: postgres), is not held back. An existing table is
-- left as it is: `taskcast doctor` and `migrate` report it if it is open.
DO $$
BEGIN
  IF to_regclass('public.image_tasks') IS NULL THEN
    CREATE TABLE public.image_tasks (
      id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
      user_id uuid,
      prompt text,
      status text NOT NULL DEFAULT 'pending',
      progress NUMERIC DEFAULT NULL,
      stage TEXT DEFAULT NULL,
      image_url text,
      error text,
      created_at timestamptz NOT NULL DEFAULT now(),
      updated_at timestamptz NOT NULL DEFAULT now()
    );
    ALTER TABLE public.image_tasks ENABLE ROW LEVEL SECURITY;
  END IF;
END
$$;

-- The deployment guide's migration, exactly: progress and stage for an existing table.
ALTER TABLE public.image_tasks
ADD COLUMN IF NOT EXISTS progress NUMERIC DEFAULT NULL;

ALTER TABLE public.image_tasks
ADD COLUMN IF NOT EXISTS stage TEXT DEFAULT NULL;

-- Columns taskcast reads or writes that an older table may lack.
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS user_id uuid;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS prompt text;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'pending';
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS image_url text;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS error text;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();

-- Steps and previews (optional: taskcast serves a table without them, and refuses only a
-- push that sets them): "step 12 of 30", and the URL of a low-resolution in-progress image.
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS step integer;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS total_steps integer;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS preview_url text;

-- Stalled tasks (optional: without it stall detection is off): when the stall sweep found
-- a processing task without a change for TASKCAST_STALL_SECS. Set by one conditional
-- UPDATE (one node wins), cleared by the next change.
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS stalled_since timestamptz;

-- Cancel requests (optional like the three above: a table without it refuses only a
-- cancel): when a subscriber asked to stop the task. taskcast sets it with one conditional
-- UPDATE (only on an unfinished task, only once); the generator sees it in the answer to
-- its next push. The partial index keeps the grace-period sweep
-- (TASKCAST_CANCEL_GRACE_SECS) from reading the whole table.
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS cancel_requested_at timestamptz;
CREATE INDEX IF NOT EXISTS image_tasks_cancel_requested_at
  ON public.image_tasks (cancel_requested_at) WHERE cancel_requested_at IS NOT NULL;

-- Versioning, owned by taskcast (prefixed so they never collide with an app's own columns):
-- taskcast_version grows by one with every applied change, so no subscriber ever sees a
-- task go backwards; taskcast_seq is the last applied `seq` from the generator, so a
-- retried or reordered push is answered without being applied twice.
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS taskcast_version bigint NOT NULL DEFAULT 0;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS taskcast_seq bigint;

-- A user's feed (`user:<id>`) reads that user's unfinished and latest finished tasks, newest
-- first: this index finds the user's rows, which are then sorted. Built once, without
-- CONCURRENTLY (migrate runs in one transaction): on a large existing table, create it
-- yourself first with CREATE INDEX CONCURRENTLY and this line does nothing.
--
-- No index may hold a column a push writes (progress, stage, status, updated_at...): an
-- UPDATE that changes an indexed column cannot be a HOT update, so every push would add an
-- entry to every index and leave a dead row for VACUUM. The earlier feed index on
-- (user_id, updated_at) did exactly that, and is dropped.
CREATE INDEX IF NOT EXISTS image_tasks_user_id_idx ON public.image_tasks (user_id);
DROP INDEX IF EXISTS public.image_tasks_user_id_updated_at_idx;

-- The guide's helper, made safe: SECURITY INVOKER (the caller's own rights; the guide's
-- SECURITY DEFINER is not needed to read the catalog) and a fixed search_path.
CREATE OR REPLACE FUNCTION public.check_column_exists(
  table_name_param TEXT,
  column_name_param TEXT
)
RETURNS TABLE (column_exists BOOLEAN)
LANGUAGE sql STABLE SECURITY INVOKER
SET search_path = pg_catalog
AS $$
  SELECT COUNT(*) > 0 AS column_exists
  FROM information_schema.columns
  WHERE table_name = table_name_param
    AND column_name = column_name_param
    AND table_schema = 'public';
$$;

-- Browsers may not call it: Supabase grants EXECUTE on new functions to anon and
-- authenticated explicitly, so revoking from PUBLIC alone is not enough. The owner (and
-- Supabase's server-side service_role) keep it.
REVOKE EXECUTE ON FUNCTION public.check_column_exists(text, text) FROM PUBLIC;
DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      EXECUTE format('REVOKE EXECUTE ON FUNCTION public.check_column_exists(text, text) FROM %I', r);
    END IF;
  END LOOP;
END
$$;

-- Fan-out across nodes, and for writes that do not come through taskcast.
--
-- Any UPDATE that changes what browsers see (progress, stage, status, image_url, error,
-- step, total_steps, preview_url, cancel_requested_at), from any writer, gets a new
-- taskcast_version: taskcast's own UPDATE bumps it itself, so the trigger only bumps when
-- the writer did not (the app's plain SQL). The optional columns are read through jsonb, so a table
-- without them keeps working.
CREATE OR REPLACE FUNCTION public.taskcast_bump_version()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
  IF NEW.taskcast_version IS NOT DISTINCT FROM OLD.taskcast_version AND (
       NEW.progress IS DISTINCT FROM OLD.progress
    OR NEW.stage IS DISTINCT FROM OLD.stage
    OR NEW.status IS DISTINCT FROM OLD.status
    OR NEW.image_url IS DISTINCT FROM OLD.image_url
    OR NEW.error IS DISTINCT FROM OLD.error
    OR jsonb_build_array(to_jsonb(NEW) -> 'step', to_jsonb(NEW) -> 'total_steps',
                         to_jsonb(NEW) -> 'preview_url', to_jsonb(NEW) -> 'cancel_requested_at')
       IS DISTINCT FROM
       jsonb_build_array(to_jsonb(OLD) -> 'step', to_jsonb(OLD) -> 'total_steps',
                         to_jsonb(OLD) -> 'preview_url', to_jsonb(OLD) -> 'cancel_requested_at')) THEN
    NEW.taskcast_version := OLD.taskcast_version + 1;
    NEW.updated_at := now();
    -- A change clears the stall mark (through jsonb: a table may lack the column).
    IF to_jsonb(NEW) -> 'stalled_since' <> 'null'::jsonb THEN
      NEW := jsonb_populate_record(NEW, '{"stalled_since": null}'::jsonb);
    END IF;
  END IF;
  RETURN NEW;
END
$$;

-- One notification per statement, not per row: the ids and new versions of the changed,
-- inserted or deleted rows as "<uuid> <version>,<uuid> <version>,...", cut into chunks below Postgres's
-- 8000-byte payload limit, on one channel (the trigger's argument). Nodes read the rows
-- they have subscribers for.
CREATE OR REPLACE FUNCTION public.taskcast_notify()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
  channel text := coalesce(TG_ARGV[0], 'taskcast');
  entries text[];
  payload text;
  first integer := 1;
  bytes integer := -1;
  entry_bytes integer;
BEGIN
  -- A taskcast node alone on the database marks its own pushes so (set_config in the push
  -- statement, TASKCAST_NOTIFY_OWN_PUSHES=auto): it publishes them to its own subscribers,
  -- and no other node listens. Every other writer, and every other statement, notifies.
  IF current_setting('taskcast.quiet', true) = 'on' THEN
    RETURN NULL;
  END IF;
  -- Every updated row, changed or not (comparing with the old rows cost more than the
  -- UPDATE itself, so the UPDATE trigger keeps none): a row whose version did not change
  -- is ignored by the listeners, which only read versions newer than they hold. Inserted
  -- and deleted rows are sent too: they move other tasks' places in line.
  IF TG_OP = 'DELETE' THEN
    entries := ARRAY(SELECT o.id::text || ' ' || o.taskcast_version::text FROM old_rows o);
  ELSE
    entries := ARRAY(SELECT n.id::text || ' ' || n.taskcast_version::text FROM new_rows n);
  END IF;
  -- Joined in one call, not appended entry by entry (each append copied the payload so
  -- far). Most statements fit one notification.
  payload := array_to_string(entries, ',');
  IF octet_length(payload) <= 7999 THEN
    IF payload <> '' THEN
      PERFORM pg_notify(channel, payload);
    END IF;
    RETURN NULL;
  END IF;
  -- Larger ones: as many entries as fit in each chunk, in order; only lengths are added up.
  FOR i IN 1 .. cardinality(entries) LOOP
    entry_bytes := octet_length(entries[i]);
    IF i > first AND bytes + 1 + entry_bytes > 7999 THEN
      PERFORM pg_notify(channel, array_to_string(entries[first:i - 1], ','));
      first := i;
      bytes := entry_bytes;
    ELSE
      bytes := bytes + 1 + entry_bytes;
    END IF;
  END LOOP;
  PERFORM pg_notify(channel, array_to_string(entries[first:], ','));
  RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION public.taskcast_bump_version() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.taskcast_notify() FROM PUBLIC;

DROP TRIGGER IF EXISTS taskcast_bump_version ON public.image_tasks;
CREATE TRIGGER taskcast_bump_version
  BEFORE UPDATE ON public.image_tasks
  FOR EACH ROW
  WHEN (NEW.taskcast_version IS NOT DISTINCT FROM OLD.taskcast_version)
  EXECUTE FUNCTION public.taskcast_bump_version();

-- `taskcast migrate --notify-channel NAME` recreates this trigger with NAME. Only the new
-- rows are kept for it: an OLD TABLE (which earlier versions declared) makes Postgres keep
-- a copy of every updated row's old version that the function never reads.
DROP TRIGGER IF EXISTS taskcast_notify ON public.image_tasks;
CREATE TRIGGER taskcast_notify
  AFTER UPDATE ON public.image_tasks
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.taskcast_notify('taskcast');

-- New rows and deleted rows notify too (a trigger with transition tables takes one event):
-- taskcast's POST /api/tasks on any node or the app's plain INSERT, so a user's feed shows
-- a task created after it subscribed, and places in line follow tasks created or deleted
-- in plain SQL. Same function, same channel (migrate --notify-channel recreates both).
DROP TRIGGER IF EXISTS taskcast_notify_insert ON public.image_tasks;
CREATE TRIGGER taskcast_notify_insert
  AFTER INSERT ON public.image_tasks
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.taskcast_notify('taskcast');

DROP TRIGGER IF EXISTS taskcast_notify_delete ON public.image_tasks;
CREATE TRIGGER taskcast_notify_delete
  AFTER DELETE ON public.image_tasks
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION public.taskcast_notify('taskcast');
