//! A websocket client just big enough for the tests: the handshake, one
//! echoed message, and reading the short frames a server sends (its close).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::LIMIT;

/// A websocket to the FastAPI app's `/ws` echo, open (the handshake
/// answered 101 and one message echoed).
pub fn open_websocket(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("the handshake's answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A masked text frame (mask 0), echoed unmasked.
    s.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i']).unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).expect("the echo");
    assert_eq!(echo, [0x81, 2, b'h', b'i']);
    s
}

/// The next frame on `s`: (opcode, payload); a close frame's payload starts
/// with its status code.
pub fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head)?;
    let len = (head[1] & 0x7f) as usize;
    assert!(
        len < 126 && head[1] & 0x80 == 0,
        "a short unmasked frame: {head:?}"
    );
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((head[0] & 0x0f, payload))
}
