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

CREATE TABLE IF NOT EXISTS public.image_tasks (
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

-- Versioning, owned by taskcast (prefixed so they never collide with an app's own columns):
-- taskcast_version grows by one with every applied change, so no subscriber ever sees a
-- task go backwards; taskcast_seq is the last applied `seq` from the generator, so a
-- retried or reordered push is answered without being applied twice.
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS taskcast_version bigint NOT NULL DEFAULT 0;
ALTER TABLE public.image_tasks ADD COLUMN IF NOT EXISTS taskcast_seq bigint;

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
