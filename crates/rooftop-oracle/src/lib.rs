//! Finds the Python environment holding the reference implementations and runs the
//! oracle scripts in `tests/oracle/`. Tests fail (never silently pass) when the
//! oracle is missing; set `ROOFTOP_SKIP_ORACLE=1` to skip them deliberately.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

/// The interpreter to use: `$ROOFTOP_PYTHON`, else `<root>/.venv/bin/python`.
pub fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ROOFTOP_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = workspace_root().join(".venv/bin/python");
    venv.exists().then_some(venv)
}

/// True when the caller should skip: only if explicitly asked to.
pub fn skip_requested() -> bool {
    std::env::var("ROOFTOP_SKIP_ORACLE").is_ok_and(|v| v == "1")
}

/// Run `tests/oracle/<script>` with `args`; panics with the script's stderr on failure
/// (this is test support: a panic is the test failing with a reason).
pub fn run(script: &str, args: &[&Path]) -> String {
    let py = python().unwrap_or_else(|| {
        panic!(
            "no oracle Python found: run scripts/setup-oracle (creates .venv with mlx, mlx-lm) \
             or set ROOFTOP_PYTHON; set ROOFTOP_SKIP_ORACLE=1 to skip oracle tests"
        )
    });
    let path = workspace_root().join("tests/oracle").join(script);
    let out = Command::new(&py)
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", py.display()));
    if !out.status.success() {
        panic!(
            "oracle {} failed ({}):\n{}",
            script,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh temporary directory under the target dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!(
            "rooftop-{tag}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&base).expect("create temp dir");
        TempDir(base)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
