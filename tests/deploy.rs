//! Deployment: drover started the way systemd starts it (socket activation,
//! a notify socket, the settings of the shipped units in deploy/systemd).

mod common;

use std::net::TcpListener;

use common::*;

/// Two sockets handed in as systemd does (fds 3 and 4), of which the config
/// binds only the first: the second is reported as an error, and the first
/// is served and logged as inherited.
#[test]
fn an_activated_socket_that_matches_no_bind_is_an_error() {
    let served = TcpListener::bind("127.0.0.1:0").unwrap();
    let served_addr = served.local_addr().unwrap();
    let stray = TcpListener::bind("127.0.0.1:0").unwrap();
    let stray_addr = stray.local_addr().unwrap();
    let bind = served_addr.to_string();
    let start = Start {
        pass: vec![(served.into(), 3), (stray.into(), 4)],
        systemd: true,
        ..Start::args(&["-b", &bind, "--", hello_bin()])
    };
    let d = start.run();
    assert_eq!(get_ok(served_addr, "/").status, 200);
    let log = d.wait_log("listening on ");
    assert!(
        log.contains(&format!(
            "listening on {served_addr} (inherited, fd name \"bind0\")"
        )),
        "{log}"
    );
    let log = d.wait_log("matches no bind");
    let line = log.lines().find(|l| l.contains("matches no bind")).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&format!("the activated socket fd 4 ({stray_addr})")),
        "{line}"
    );
    // Closed: nothing accepts on that address any more.
    assert!(std::net::TcpStream::connect(stray_addr).is_err());
}

/// A bind drover opens itself is not called inherited.
#[test]
fn a_bind_opened_by_drover_is_not_called_inherited() {
    let d = Start::args(&["-b", "127.0.0.1:0", "--", hello_bin()]).run();
    let log = d.wait_log("listening on ");
    let line = log.lines().find(|l| l.contains("listening on ")).unwrap();
    assert!(line.ends_with("(fd name \"bind0\")"), "{line}");
}

/// `drover check` given the same sockets fails on the stray one (status 2,
/// the same message), and passes when every socket matches a bind.
#[test]
fn check_reports_an_activated_socket_that_matches_no_bind() {
    let served = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = served.local_addr().unwrap().to_string();
    let stray = TcpListener::bind("127.0.0.1:0").unwrap();
    let stray_addr = stray.local_addr().unwrap();
    let mut d = Start {
        pass: vec![(served.into(), 3), (stray.into(), 4)],
        systemd: true,
        ..Start::args(&["check", "-b", &bind, "--", hello_bin()])
    }
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(2), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!(
            "drover: error: the activated socket fd 4 ({stray_addr}) matches no bind"
        )),
        "{log}"
    );
    assert!(!log.contains("ok ("), "{log}");

    let served = TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = served.local_addr().unwrap().to_string();
    let mut d = Start {
        pass: vec![(served.into(), 3)],
        systemd: true,
        ..Start::args(&["check", "-b", &bind, "--", hello_bin()])
    }
    .run();
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
}
