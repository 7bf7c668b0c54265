//! The Python environment the tests run Python workers in: a virtualenv with
//! the drover-worker package installed from workers/python as a user installs
//! it (`.ci/python-env` makes it). Tests never import the SDK from the checkout.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::repo;

/// `$DROVER_TEST_VENV` (relative to the repository, or absolute), else `.venv`.
pub fn venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let venv = repo().join(std::env::var("DROVER_TEST_VENV").unwrap_or(".venv".into()));
        let python = venv.join("bin/python");
        assert!(
            python.exists(),
            "{} does not exist: make the tests' Python environment with `bash .ci/python-env` \
             (or point DROVER_TEST_VENV at one)",
            python.display()
        );
        check_fresh(&venv);
        venv
    })
    .clone()
}

/// The venv's interpreter.
pub fn python() -> String {
    venv().join("bin/python").display().to_string()
}

/// A console script the package (or a test dependency) installed in the venv.
pub fn script(name: &str) -> String {
    venv().join("bin").join(name).display().to_string()
}

/// The venv's `bin` directory first, then the test's own PATH: a worker
/// command can name `drover-wsgi` as a user's shell would find it.
pub fn path_with_venv() -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    format!("{}:{rest}", venv().join("bin").display())
}

/// Where the example apps are (`example_app:app` is imported from there).
pub fn examples_dir() -> String {
    repo().join("workers/python/examples").display().to_string()
}

/// Where the Python tests' own apps are (`apps:app`, `broken_app:app`).
pub fn test_apps_dir() -> String {
    repo().join("workers/python/tests").display().to_string()
}

/// Panics when the installed package differs from workers/python/src (the
/// tests would run old code). An editable install has nothing to compare;
/// DROVER_TEST_STALE_OK=1 runs the tests against another version on purpose
/// (to see a new test fail on the old code).
fn check_fresh(venv: &Path) {
    if std::env::var_os("DROVER_TEST_STALE_OK").is_some() {
        return;
    }
    let src = repo().join("workers/python/src");
    let Some(site) = std::fs::read_dir(venv.join("lib"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
    else {
        return;
    };
    if !site.join("drover_worker/__init__.py").exists() {
        return;
    }
    let mut stale = Vec::new();
    compare(&src, &src, &site, &mut stale);
    // The native core, when installed: built after its sources last changed.
    let native = site.join("drover_wsgi_native");
    let built = std::fs::read_dir(&native).ok().and_then(|d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".so"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()
    });
    let sources = ["workers/python/native/src", "workers/python/native/h1/src"]
        .iter()
        .filter_map(|dir| super::newest_change(&repo().join(dir)))
        .max();
    if let (Some(built), Some(sources)) = (built, sources) {
        if built < sources {
            stale.push("drover_wsgi_native (older than workers/python/native)".to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "the drover-worker package installed in {} is not workers/python/src ({} differ): \
         run `bash .ci/python-env` again",
        venv.display(),
        stale.join(", ")
    );
}

fn compare(root: &Path, dir: &Path, site: &Path, stale: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "__pycache__" && !name.ends_with(".egg-info") {
                compare(root, &path, site, stale);
            }
        } else if name.ends_with(".py") || name == "py.typed" {
            let rel = path.strip_prefix(root).unwrap();
            if std::fs::read(&path).ok() != std::fs::read(site.join(rel)).ok() {
                stale.push(rel.display().to_string());
            }
        }
    }
}
