//! hello outside drover: with no sockets handed to it, it says why and exits
//! with 3 ("cannot boot"), so that a supervisor does not respawn it in a loop.
//! (Having an integration test also makes `cargo test` build the `hello`
//! executable that drover's own tests run.)

use std::process::Command;

#[test]
fn without_sockets_it_cannot_boot() {
    let out = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .output()
        .expect("run hello");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot boot:"), "{stderr}");
}
