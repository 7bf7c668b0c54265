//! The command line as a user meets it: the version, completion scripts that
//! the shells accept, the manual page, `drover ctl`'s options, settings from
//! the environment and where each setting came from.

mod common;

use std::process::{Command, Output};

use common::*;

/// `drover ARGS` run to completion (with no DROVER_* of the caller's).
fn drover(args: &[&str], env: &[(&str, &str)], dir: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(drover_bin());
    cmd.args(args).current_dir(dir.unwrap_or(&repo()));
    cmd.env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DROVER_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run drover")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_names_the_commit_and_the_target() {
    let out = drover(&["--version"], &[], None);
    let line = text(&out.stdout);
    // drover 0.1.0 (0123456789 2026-12-04, x86_64-unknown-linux-gnu)
    let rest = line
        .strip_prefix(&format!("drover {} (", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("{line}"));
    let (commit, rest) = rest.split_once(' ').unwrap();
    assert!(
        commit.len() == 10 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{line}"
    );
    let (date, target) = rest.split_once(", ").unwrap();
    assert_eq!(date.len(), 10, "{line}");
    assert!(target.trim_end().ends_with(')'), "{line}");
    assert!(target.contains("-linux-"), "{line}");
}

/// A completion script from `drover completions SHELL`, which `check` (a
/// shell run with the script on its standard input) accepts.
fn completions_pass(shell: &str, check: &[&str]) {
    let out = drover(&["completions", shell], &[], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!out.stdout.is_empty());
    let script =
        std::env::temp_dir().join(format!("drover-completion-{}.{shell}", std::process::id()));
    std::fs::write(&script, &out.stdout).unwrap();
    let checked = Command::new(check[0])
        .args(&check[1..])
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (CI installs it: .ci/run)", check[0]));
    std::fs::remove_file(&script).ok();
    assert!(
        checked.status.success(),
        "{shell} refuses the script: {}",
        text(&checked.stderr)
    );
}

#[test]
fn completion_scripts_are_accepted_by_bash_zsh_and_fish() {
    completions_pass("bash", &["bash", "-n"]);
    completions_pass("zsh", &["zsh", "-n"]);
    completions_pass("fish", &["fish", "--no-execute"]);
}

#[test]
fn bash_completes_subcommands_and_options() {
    let script = format!(
        r#"source <("{drover}" completions bash)
complete_line() {{ COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}};
  _drover drover "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"; echo "${{COMPREPLY[*]}}"; }}
complete_line drover ctl st
complete_line drover --wor
complete_line drover ctl status --js"#,
        drover = drover_bin()
    );
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "status stop\n--workers\n--json\n",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn man_pages_come_from_the_same_definitions() {
    let page = text(&drover(&["man"], &[], None).stdout);
    assert!(page.contains(".TH drover 1"), "{page}");
    assert!(page.contains("WORKER_COMMAND"), "{page}");
    for option in ["\\-\\-workers", "\\-\\-set", "completions", "ctl"] {
        assert!(page.contains(option), "{option} missing from:\n{page}");
    }
    let page = text(&drover(&["man", "ctl"], &[], None).stdout);
    assert!(
        page.contains(".TH drover\\-ctl 1") || page.contains(".TH drover-ctl 1"),
        "{page}"
    );
    assert!(page.contains("\\-\\-json"), "{page}");
    let out = drover(&["man", "nope"], &[], None);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "drover man: no subcommand \"nope\": expected check, ctl, completions or man\n"
    );
}

#[test]
fn usage_names_the_worker_command() {
    let help = text(&drover(&["--help"], &[], None).stdout);
    assert!(
        help.contains("Usage: drover [OPTIONS] [-- <WORKER_COMMAND>...]\n"),
        "{help}"
    );
    assert!(
        help.contains("drover ctl [-c FILE | --socket PATH]"),
        "{help}"
    );
    // The usage line names every command `drover ctl --help` lists.
    let ctl_help = text(&drover(&["ctl", "--help"], &[], None).stdout);
    let commands: Vec<&str> = ctl_help
        .split("Commands:\n")
        .nth(1)
        .expect("drover ctl --help lists its commands")
        .lines()
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    let usage = help
        .lines()
        .find(|line| line.contains("drover ctl ["))
        .unwrap();
    for command in &commands {
        assert!(usage.contains(command), "{usage} leaves out {command}");
    }
    assert!(commands.contains(&"events"), "{commands:?}");
}

#[test]
fn ctl_takes_its_options_anywhere_and_only_its_own() {
    // Options after the command reach ctl: it tries the socket (exit 1).
    let out = drover(
        &[
            "ctl",
            "status",
            "--json",
            "--socket",
            "/nonexistent/ctl.sock",
            "--timeout",
            "2s",
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("/nonexistent/ctl.sock"),
        "{}",
        text(&out.stderr)
    );
    // A run's options are refused, before or after `ctl`.
    let out = drover(&["-w", "3", "ctl", "status"], &[], None);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "drover ctl: --workers is not an option of `drover ctl` (see drover ctl --help)\n"
    );
    let out = drover(&["ctl", "status", "-w", "3"], &[], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unexpected argument '-w'"),
        "{}",
        text(&out.stderr)
    );
    let help = text(&drover(&["ctl", "--help"], &[], None).stdout);
    assert!(
        !help.contains("--workers") && !help.contains("--pidfile"),
        "{help}"
    );
}

#[test]
fn ctl_status_json_after_the_command_answers_from_a_running_drover() {
    let config = format!(
        "bind = \"127.0.0.1:0\"\ncommand = [\"{}\"]\nworkers = 2\nready = \"notify\"\n\
         control_socket = \"$DIR/ctl.sock\"\n",
        hello_bin()
    );
    let d = Start::config(&config).run();
    d.wait_log("all 2 workers ready");
    let config_path = d.dir.path().join("config.toml");
    // -c after the command: the socket comes from the config.
    let out = drover(
        &[
            "ctl",
            "status",
            "--json",
            "-c",
            config_path.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["status"]["workers"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
}

#[test]
fn settings_come_from_the_environment_between_the_file_and_the_command_line() {
    let config = format!(
        "bind = \"127.0.0.1:0\"\ncommand = [\"{}\"]\nworkers = 1\ngraceful_timeout = \"9s\"\nready = \"notify\"\n",
        hello_bin()
    );
    // A run: DROVER_WORKERS=3 beats the file's 1.
    let d = Start {
        env: vec![("DROVER_WORKERS".into(), "3".into())],
        ..Start::config(&config)
    }
    .run();
    d.wait_log("all 3 workers ready");
    drop(d);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.toml");
    std::fs::write(&path, &config).unwrap();
    let out = drover(
        &["check", "--print", "-c", path.to_str().unwrap(), "-w", "4"],
        &[
            ("DROVER_WORKERS", "3"),
            ("DROVER_GRACEFUL_TIMEOUT", "2s"),
            ("DROVER_MAX_AGE", "1h"),
            ("DROVER_WORKR", "3"),
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} ")))
            .unwrap_or_else(|| panic!("{key} not in:\n{stdout}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("workers"), "workers = 4 # --workers 4");
    assert_eq!(
        line("graceful_timeout"),
        "graceful_timeout = \"2s\" # environment DROVER_GRACEFUL_TIMEOUT"
    );
    assert_eq!(
        line("max_age"),
        "max_age = \"1h\" # environment DROVER_MAX_AGE"
    );
    assert_eq!(
        line("ready"),
        "ready = \"notify\" # app.toml:5:9".replace("app.toml", path.to_str().unwrap())
    );
    assert_eq!(line("backlog"), "backlog = 2048 # default");
    assert_eq!(line("timeout"), "# timeout (unset) # default");
    assert_eq!(
        text(&out.stderr),
        "drover: warning: DROVER_WORKR is not a setting (did you mean DROVER_WORKERS?): ignored\n"
    );
}

#[test]
fn a_drover_run_as_a_worker_of_another_ignores_its_stop_budget() {
    let out = drover(
        &["check", "--print", "--", "true"],
        &[
            ("DROVER_WORKER_ID", "1"),
            ("DROVER_GENERATION", "1"),
            ("DROVER_GRACEFUL_TIMEOUT", "7"),
            ("DROVER_QUICK_TIMEOUT", "5"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("graceful_timeout = \"30s\""));
    assert!(
        text(&out.stderr).starts_with(
            "drover: warning: DROVER_GRACEFUL_TIMEOUT=7 is ignored: DROVER_WORKER_ID is set"
        ),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_drover_toml_in_the_working_directory_is_found() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("drover.toml"),
        "command = [\"true\"]\nworkers = 2\n",
    )
    .unwrap();
    let out = drover(&["check"], &[], Some(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("drover.toml: ok (2 worker(s)"),
        "{}",
        text(&out.stdout)
    );
    // DROVER_CONFIG names another one; -c wins over both.
    std::fs::write(
        dir.path().join("other.toml"),
        "command = [\"true\"]\nworkers = 3\n",
    )
    .unwrap();
    let out = drover(
        &["check"],
        &[("DROVER_CONFIG", "other.toml")],
        Some(dir.path()),
    );
    assert!(
        text(&out.stdout).starts_with("other.toml: ok (3 worker(s)"),
        "{}",
        text(&out.stdout)
    );
    let out = drover(
        &["-c", "drover.toml", "check"],
        &[("DROVER_CONFIG", "other.toml")],
        Some(dir.path()),
    );
    assert!(
        text(&out.stdout).starts_with("drover.toml: ok (2 worker(s)"),
        "{}",
        text(&out.stdout)
    );
}

/// `drover ARGS` in `dir` until it exits: what it printed on standard error,
/// without the time stamps and levels, and its exit status.
fn errors_in(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, Vec<String>) {
    let out = drover(args, &[], Some(dir));
    let lines = text(&out.stderr)
        .lines()
        .filter(|l| l.contains("ERROR") || l.starts_with("drover:"))
        .map(|l| l.split_once("ERROR ").map_or(l, |(_, m)| m).to_string())
        .collect();
    (out.status.code(), lines)
}

/// A script that is executable, run as a `user` that cannot reach its `#!`
/// interpreter (a virtualenv made from a Python installed under /root, whose
/// `bin/python3` links there): the exec fails with EACCES, and drover said
/// "it is not executable: chmod +x it", which it was. Now it names the
/// interpreter and the user's access as the likely cause.
#[test]
fn an_executable_whose_interpreter_the_user_cannot_reach_is_named() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let interpreter = private.path().join("sh");
    std::os::unix::fs::symlink("/bin/sh", &interpreter).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = dir.path().join("app");
    std::fs::write(
        &app,
        format!(
            "#!{}\necho RAN-AS $(id -u) >&2; exit 3\n",
            interpreter.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = app.display().to_string();
    let (status, errors) = errors_in(
        dir.path(),
        &["-b", "127.0.0.1:0", "--set", "user=nobody", "--", &app],
    );
    assert_eq!(status, Some(3), "{errors:?}");
    let first = errors.first().cloned().unwrap_or_default();
    assert!(
        first.contains("execve failed: EACCES")
            && !first.contains("chmod +x")
            && first.contains(&format!(
                "its #! interpreter, {}, or a directory on the way to either",
                interpreter.display()
            )),
        "{errors:?}"
    );
}

#[test]
fn a_script_that_is_not_executable_is_to_be_run_with_its_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.py"), "print('hi')\n").unwrap();
    let (status, errors) = errors_in(dir.path(), &["-b", "127.0.0.1:0", "--", "./app.py"]);
    assert_eq!(status, Some(3), "{errors:?}");
    assert_eq!(
        errors.first().map(String::as_str),
        Some(
            "worker 1 cannot boot: ./app.py: execve failed: EACCES: Permission denied; it is not \
             executable: run it with python3: command = [\"python3\", \"./app.py\", ...] (or make \
             it executable with a #! line)"
        ),
        "{errors:?}"
    );
    // drover check says the same before anything starts.
    let (status, errors) = errors_in(dir.path(), &["check", "--", "./app.py"]);
    assert_eq!(status, Some(3));
    assert_eq!(
        errors,
        [
            "drover: cannot run the worker command: ./app.py: not an executable file; it is not \
          executable: run it with python3: command = [\"python3\", \"./app.py\", ...] (or make it \
          executable with a #! line)"
        ]
    );
}

#[test]
fn a_relative_command_not_found_names_the_directory_it_was_looked_for_in() {
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().canonicalize().unwrap();
    let (status, errors) = errors_in(
        dir.path(),
        &["-b", "127.0.0.1:0", "--", "target/release/hello"],
    );
    assert_eq!(status, Some(3), "{errors:?}");
    assert_eq!(
        errors.first().cloned(),
        Some(format!(
            "worker 1 cannot boot: target/release/hello: execve failed: ENOENT: No such file or \
             directory; a relative command is resolved against drover's working directory, {} \
             (set chdir, or give an absolute path)",
            here.display()
        )),
        "{errors:?}"
    );
    let (_, errors) = errors_in(
        dir.path(),
        &[
            "-b",
            "127.0.0.1:0",
            "--set",
            "chdir=/",
            "--",
            "target/release/hello",
        ],
    );
    assert_eq!(
        errors.first().map(String::as_str),
        Some(
            "worker 1 cannot boot: target/release/hello: execve failed: ENOENT: No such file or \
             directory; a relative command is resolved against the workers' working directory, \
             chdir = \"/\""
        ),
        "{errors:?}"
    );
    // A script whose #! interpreter is missing is ENOENT too, and says so.
    let script = dir.path().join("old.py");
    std::fs::write(&script, "#!/nonexistent/python2\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (_, errors) = errors_in(dir.path(), &["-b", "127.0.0.1:0", "--", "./old.py"]);
    assert_eq!(
        errors.first().map(String::as_str),
        Some(
            "worker 1 cannot boot: ./old.py: execve failed: ENOENT: No such file or directory; \
             the interpreter on its #! line is missing (or the line ends with \\r)"
        ),
        "{errors:?}"
    );
}

#[test]
fn check_says_a_missing_command_is_missing() {
    // It said "not an executable file" for a file that is not there.
    let dir = tempfile::tempdir().unwrap();
    let here = dir.path().canonicalize().unwrap();
    let out = drover(&["check", "--", "./nothere.py"], &[], Some(&here));
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!(
            "drover: cannot run the worker command: ./nothere.py: no such file; a relative \
             command is resolved against drover's working directory, {} (set chdir, or give an \
             absolute path)",
            here.display()
        )
    );
}

#[test]
fn bind_as_one_string_is_one_address() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("drover.toml"),
        "bind = \"127.0.0.1:0\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let out = drover(&["check"], &[], Some(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("listening on 127.0.0.1:0"),
        "{}",
        text(&out.stdout)
    );
}

/// What `cargo install --path .` installs is the drover package's binaries:
/// `drover` alone (the reference worker is a package of its own, not
/// published).
#[test]
fn the_drover_package_installs_drover_only() {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let package = |name: &str| {
        meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no package {name}"))
            .clone()
    };
    let bins: Vec<String> = package("drover")["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bins, ["drover"]);
    assert_eq!(package("hello")["publish"], serde_json::json!([]));
    for name in ["drover", "drover-worker"] {
        let p = package(name);
        for field in [
            "description",
            "license",
            "documentation",
            "readme",
            "rust_version",
        ] {
            assert!(p[field].is_string(), "{name} has no {field}");
        }
        assert!(
            !p["keywords"].as_array().unwrap().is_empty(),
            "{name}: keywords"
        );
        assert!(
            !p["categories"].as_array().unwrap().is_empty(),
            "{name}: categories"
        );
    }
}

#[test]
fn a_file_named_without_its_directory_is_not_looked_up_there() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.py"), "print('hi')\n").unwrap();
    let (status, errors) = errors_in(dir.path(), &["-b", "127.0.0.1:0", "--", "app.py"]);
    assert_eq!(status, Some(3), "{errors:?}");
    assert_eq!(
        errors.first().map(String::as_str),
        Some(
            "cannot run the worker command: \"app.py\": command not found in PATH; app.py in the \
             working directory is named \"./app.py\" (a name without '/' is looked up in PATH \
             only); it is not executable: run it with python3: command = [\"python3\", \
             \"./app.py\", ...] (or make it executable with a #! line)"
        ),
        "{errors:?}"
    );
}
