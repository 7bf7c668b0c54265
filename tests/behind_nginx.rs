//! drover behind nginx, with the nginx config docs/deployment.md gives
//! ("Behind nginx"), taken from the doc itself: what a client of nginx
//! sees. nginx (Debian's `nginx-light`, installed by .ci/run) runs in the
//! foreground in a temporary directory, on an ephemeral loopback port, and
//! is killed at the end.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};

use common::websocket::{open_websocket, read_frame};
use common::*;

/// nginx in front of `upstream` (`unix:PATH` or `HOST:PORT`), configured by
/// docs/deployment.md's nginx block.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream: &str) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        // A free port: nginx binds it a moment later (no other process
        // here takes ports from the ephemeral range meanwhile).
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let doc = read_file(&repo().join("docs/deployment.md"));
        let block = documented_block(&doc)
            .replace("unix:/run/drover/http.sock", upstream)
            .replacen(
                "server {",
                &format!(
                    "server {{\n    listen {addr};\n    access_log {}/access.log;",
                    dir.path().display()
                ),
                1,
            );
        let d = dir.path().display();
        let conf = format!(
            "error_log {d}/error.log info;\npid {d}/nginx.pid;\nevents {{}}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             {block}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let mut cmd = Command::new(nginx_bin());
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            // One process, no privilege drop: it reaches drover's socket in
            // the test's private directory, and dies with the test.
            .args(["-g", "daemon off; master_process off;"]);
        let child = bounded(&mut cmd).spawn().expect("start nginx");
        let mut nginx = Nginx { child, addr, dir };
        wait_for("nginx to listen", LIMIT, || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}): {}", nginx.error_log());
            }
            TcpStream::connect(addr).ok()
        });
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first ```nginx block of docs/deployment.md.
fn documented_block(doc: &str) -> String {
    let start = doc
        .find("```nginx\n")
        .expect("an nginx block in docs/deployment.md")
        + 9;
    let len = doc[start..].find("```").expect("the block's end");
    doc[start..start + len].to_string()
}

fn nginx_bin() -> String {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin"])
    {
        let path = Path::new(dir).join("nginx");
        if path.is_file() {
            return path.display().to_string();
        }
    }
    panic!("nginx is not installed: apt-get install nginx-light (.ci/run does)");
}

/// drover-uvicorn serving the FastAPI test app on a Unix socket, the
/// upstream docs/deployment.md advises.
fn fastapi_on_a_unix_socket() -> Drover {
    let config = format!(
        "bind = [\"unix:$DIR/http.sock\"]\nworkers = 1\nready = \"notify\"\n\
         graceful_timeout = \"10s\"\nboot_timeout = \"60s\"\n\
         command = [{:?}, \"--chdir\", {:?}, \"--no-access-log\", \"integration.fastapi_app:app\"]\n\n\
         [env]\nAPP_CLEANUP_FILE = \"$DIR/notes\"\n",
        python::script("drover-uvicorn"),
        python::test_apps_dir(),
    );
    let d = Start::config(&config).run();
    d.wait_log("all 1 workers ready");
    d
}

/// A websocket through the documented nginx config reaches the app, and
/// at drover's stop its 1012 close ("service restart": reconnect) reaches
/// the client through nginx. The config before (December 2026) sent every
/// request with `Connection: ""`, for the upstream keep-alive, and no
/// `Upgrade`: the handshake reached uvicorn as a plain GET and the client
/// got `HTTP/1.1 404 Not Found` (found by the trial behind nginx).
#[test]
fn the_documented_nginx_config_carries_a_websocket_and_its_1012_close() {
    let mut d = fastapi_on_a_unix_socket();
    let upstream = format!("unix:{}", d.dir.path().join("http.sock").display());
    let nginx = Nginx::start(&upstream);
    let mut ws = open_websocket(nginx.addr);
    // A plain request still goes through the kept-alive upstream.
    let resp = get_ok(nginx.addr, "/");
    assert!(resp.body.starts_with("{\"pid\":"), "{}", resp.body);
    d.signal(Signal::SIGTERM);
    let (opcode, payload) = read_frame(&mut ws).expect("a close frame through nginx");
    assert_eq!(
        opcode,
        8,
        "a close frame: {payload:?} {}",
        nginx.error_log()
    );
    assert_eq!(
        u16::from_be_bytes([payload[0], payload[1]]),
        1012,
        "{}",
        d.log()
    );
    let _ = ws.write_all(&[0x88, 0x82, 0, 0, 0, 0, payload[0], payload[1]]);
    assert_eq!(d.wait_exit(LIMIT).code(), Some(0), "{}", d.log());
    let notes = read_file(&d.dir.path().join("notes"));
    assert!(notes.contains("websocket disconnect code=1012"), "{notes}");
}
