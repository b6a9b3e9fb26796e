//! What `public.image_tasks` exposes to Supabase's public roles: on Supabase, `anon` (the
//! key every browser holds) and `authenticated` get privileges on new tables in `public`,
//! so a table without row level security is readable and writable by anyone through
//! `/rest/v1/image_tasks`. `doctor` and `migrate` report it, `serve` warns at startup.

use tokio_postgres::GenericClient;

use super::finding::{Finding, Severity};

/// The table's row level security, who may use it, and whether taskcast bypasses RLS.
const TABLE_QUERY: &str = "SELECT c.relrowsecurity, \
       (c.relforcerowsecurity = false AND pg_has_role(current_user, c.relowner, 'MEMBER')) \
         OR (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user), \
       current_user::text, \
       ARRAY(SELECT r.rolname::text || ':' || p FROM pg_roles r, \
               unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p \
             WHERE r.rolname IN ('anon', 'authenticated') \
               AND has_table_privilege(r.oid, c.oid, p) ORDER BY 1), \
       ARRAY(SELECT p.polname::text FROM pg_policy p \
             WHERE p.polrelid = c.oid AND p.polcmd IN ('w', '*') \
               AND (p.polroles @> ARRAY[0::oid] \
                    OR EXISTS (SELECT 1 FROM pg_roles r \
                               WHERE r.rolname = 'anon' AND r.oid = ANY(p.polroles))) \
             ORDER BY 1), \
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) \
     FROM pg_class c WHERE c.oid = to_regclass('public.image_tasks')";

const EXECUTE_SQL_QUERY: &str = "SELECT EXISTS (SELECT 1 FROM pg_proc \
     WHERE proname = 'execute_sql' AND pronamespace = 'public'::regnamespace)";

/// What the catalog says; `table` is `None` when the table does not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    pub table: Option<TableExposure>,
    /// The deployment guide's `public.execute_sql` exists (any signature).
    pub execute_sql: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableExposure {
    pub rls: bool,
    /// taskcast's own role is not held back by RLS (owner without FORCE, superuser or
    /// BYPASSRLS).
    pub bypasses_rls: bool,
    pub role: String,
    /// `anon:SELECT`, `authenticated:UPDATE`, ...
    pub grants: Vec<String>,
    /// Policies that let `anon` (or PUBLIC) UPDATE the table (`FOR UPDATE` or `FOR ALL`).
    pub anon_update_policies: Vec<String>,
    pub policies: i64,
}

pub async fn read<C: GenericClient>(client: &C) -> Result<Exposure, tokio_postgres::Error> {
    let table = client
        .query_opt(TABLE_QUERY, &[])
        .await?
        .map(|row| TableExposure {
            rls: row.get(0),
            bypasses_rls: row.get::<_, Option<bool>>(1).unwrap_or(false),
            role: row.get(2),
            grants: row.get(3),
            anon_update_policies: row.get(4),
            policies: row.get(5),
        });
    let execute_sql = client.query_one(EXECUTE_SQL_QUERY, &[]).await?.get(0);
    Ok(Exposure { table, execute_sql })
}

const ANYONE: &str = "anyone with the project's public anon key can read and change every \
    task through /rest/v1/image_tasks";

impl Exposure {
    /// The findings about row level security and policies (the `execute_sql` finding is
    /// [`Exposure::execute_sql_finding`], since `doctor` has a fuller check of its own).
    pub fn findings(&self) -> Vec<Finding> {
        let Some(table) = &self.table else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let granted = table.grants.join(", ");
        let rls = match (table.rls, table.grants.is_empty()) {
            (false, false) => Finding {
                name: "row level security",
                severity: Severity::Critical,
                message: format!(
                    "row level security is off on public.image_tasks and {granted} are granted: \
                     {ANYONE}"
                ),
                fix: Some(
                    "ALTER TABLE public.image_tasks ENABLE ROW LEVEL SECURITY; then add the \
                     policies the app needs, e.g. CREATE POLICY \"own tasks\" ON \
                     public.image_tasks FOR SELECT TO authenticated USING (user_id = \
                     auth.uid()); (or REVOKE ALL ON public.image_tasks FROM anon, authenticated;)"
                        .to_string(),
                ),
            },
            (false, true) => Finding {
                name: "row level security",
                severity: Severity::Ok,
                message: "row level security is off on public.image_tasks, and neither anon \
                          nor authenticated may use it"
                    .to_string(),
                fix: None,
            },
            (true, _) => Finding {
                name: "row level security",
                severity: Severity::Ok,
                message: format!(
                    "row level security is on for public.image_tasks ({} policies)",
                    table.policies
                ),
                fix: None,
            },
        };
        out.push(rls);
        if table.rls && !table.bypasses_rls {
            out.push(Finding {
                name: "taskcast's role",
                severity: Severity::Warn,
                message: format!(
                    "taskcast connects as {}, which row level security holds back on \
                     image_tasks (not the owner, no BYPASSRLS): it sees and updates only the \
                     rows the policies let it",
                    table.role
                ),
                fix: Some(format!(
                    "connect as the table's owner (on Supabase: postgres), or ALTER ROLE {} \
                     BYPASSRLS;",
                    table.role
                )),
            });
        }
        let anon_updates = table.grants.iter().any(|g| g == "anon:UPDATE");
        for policy in &table.anon_update_policies {
            if table.rls && anon_updates {
                out.push(Finding {
                    name: "anon policy",
                    severity: Severity::Critical,
                    message: format!(
                        "policy {policy:?} lets anon UPDATE public.image_tasks: anyone with the \
                         public anon key can change tasks"
                    ),
                    fix: Some(format!(
                        "DROP POLICY \"{}\" ON public.image_tasks;",
                        policy.replace('"', "\"\"")
                    )),
                });
            }
        }
        out
    }

    pub fn execute_sql_finding(&self) -> Option<Finding> {
        self.execute_sql.then(|| Finding {
            name: "execute_sql",
            severity: Severity::Critical,
            message: "public.execute_sql exists: it runs any SQL, and on Supabase anyone can \
                      call it through /rest/v1/rpc/execute_sql; taskcast needs none"
                .to_string(),
            fix: Some("DROP FUNCTION IF EXISTS public.execute_sql(text);".to_string()),
        })
    }

    /// The findings worth a warning at startup: everything critical.
    pub fn warnings(&self) -> Vec<Finding> {
        (self.findings().into_iter())
            .chain(self.execute_sql_finding())
            .filter(|f| f.severity == Severity::Critical)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_table() -> TableExposure {
        TableExposure {
            rls: false,
            bypasses_rls: true,
            role: "postgres".to_string(),
            grants: vec!["anon:SELECT".to_string(), "anon:UPDATE".to_string()],
            anon_update_policies: Vec::new(),
            policies: 0,
        }
    }

    #[test]
    fn a_table_open_to_anon_without_rls_is_critical_with_the_fix() {
        let exposure = Exposure {
            table: Some(open_table()),
            execute_sql: true,
        };
        let warnings = exposure.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].message.contains("anon:UPDATE"));
        assert!(
            (warnings[0].fix.as_deref().unwrap())
                .starts_with("ALTER TABLE public.image_tasks ENABLE ROW LEVEL SECURITY;")
        );
        assert_eq!(warnings[1].name, "execute_sql");
    }

    #[test]
    fn rls_on_is_fine_unless_a_policy_lets_anon_update() {
        let mut table = TableExposure {
            rls: true,
            ..open_table()
        };
        let exposure = |t: &TableExposure| Exposure {
            table: Some(t.clone()),
            execute_sql: false,
        };
        assert!(exposure(&table).warnings().is_empty());
        table.anon_update_policies = vec!["anyone \"edits\"".to_string()];
        let warnings = exposure(&table).warnings();
        assert_eq!(
            warnings[0].fix.as_deref(),
            Some("DROP POLICY \"anyone \"\"edits\"\"\" ON public.image_tasks;")
        );
        table.bypasses_rls = false;
        let findings = exposure(&table).findings();
        assert!(findings.iter().any(|f| f.name == "taskcast's role"));
    }
}
