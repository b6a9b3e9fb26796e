//! The README keeps up with the code: every environment variable the code reads is
//! documented.

use std::collections::BTreeSet;
use std::path::Path;

/// Names of environment variables taskcast reads, as they appear anywhere in `src/`.
fn env_vars_in_source() -> BTreeSet<String> {
    const EXACT: [&str; 10] = [
        "DATABASE_URL",
        "TASK_PROCESS_SECRET_KEY",
        "TASK_PROCESS_SECRET_KEY_PREVIOUS",
        "NEXT_PUBLIC_APP_URL",
        "SUPABASE_JWT_SECRET",
        "INTERNAL_API_KEY",
        "API_SECRET_KEY",
        "OPENAI_API_KEY",
        "NODE_ENV",
        "APP_ENV",
    ];
    let mut found = BTreeSet::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for token in
                text.split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            {
                let token = token.trim_matches('_');
                if (token.starts_with("TASKCAST_") && token.len() > "TASKCAST_".len())
                    || EXACT.contains(&token)
                {
                    found.insert(token.to_string());
                }
            }
        }
    }
    found
}

#[test]
fn every_environment_variable_the_code_reads_is_in_the_readme() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md exists");
    let vars = env_vars_in_source();
    assert!(
        vars.contains("TASKCAST_LISTEN") && vars.len() > 20,
        "the scan found too little: {vars:?}"
    );
    let missing: Vec<_> = vars
        .iter()
        .filter(|v| !readme.contains(v.as_str()))
        .collect();
    assert!(missing.is_empty(), "README.md does not mention {missing:?}");
    assert!(readme.contains("RUST_LOG"));
}
