//! Running one test in a child process: for signals, process-wide state
//! (handlers, the global registry) and environment variables, which must not
//! leak into tests running in parallel threads of the same process.

use std::process::{Command, Output};

const CHILD_VAR: &str = "DROVER_WORKER_TEST_CHILD";

/// True when this process is the child started for test `name` (last path segment).
pub(crate) fn in_child(name: &str) -> bool {
    std::env::var(CHILD_VAR).is_ok_and(|v| v == name)
}

/// A command that re-runs this test binary on exactly the test `path`
/// (`module::tests::name`), in child mode.
pub(crate) fn child_command(path: &str) -> Command {
    let name = path.rsplit("::").next().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([path, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, name);
    cmd
}

/// Checks that the child ran exactly one test and that it passed; returns its stdout.
pub(crate) fn check(output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child test failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    stdout
}

/// Runs test `path` in a child with extra environment; returns its stdout.
pub(crate) fn run_child(path: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = child_command(path);
    cmd.envs(env.iter().copied());
    check(cmd.output().unwrap())
}
