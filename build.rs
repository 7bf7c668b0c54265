//! Build information for `drover --version`, as `rustc -V` shows it: the
//! commit and its date, and the target. Built outside git (from a crate
//! tarball) the commit comes from `.cargo_vcs_info.json`, which `cargo
//! package` writes; with neither, only the target is shown.

use std::path::Path;
use std::process::Command;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    let commit = git(&["log", "-1", "--format=%h %cs", "--abbrev=10"])
        .or_else(packaged_commit)
        .map(|c| format!("{c}, "))
        .unwrap_or_default();
    println!("cargo:rustc-env=DROVER_BUILD_INFO={commit}{target}");
    // Rebuild when HEAD moves (a commit, a checkout): HEAD itself and the
    // branch it names. Outside git, the tarball never changes.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(path) = git(&["rev-parse", "--git-path", &branch]) {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// What `git ARGS` prints, if git is there and this is a repository.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// The commit `cargo package` recorded: `"sha1": "<40 hex digits>"`.
fn packaged_commit() -> Option<String> {
    let info = std::fs::read_to_string(Path::new(".cargo_vcs_info.json")).ok()?;
    let after = &info[info.find("\"sha1\"")? + 6..];
    let start = after.find('"')? + 1;
    let sha: String = after[start..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    (sha.len() >= 10).then(|| sha[..10].to_string())
}
