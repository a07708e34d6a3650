//! A chat request written by hand on a raw HTTP/1.1 connection, for what a client library hides:
//! holding a stream open, no longer reading it, or seeing its bytes as they arrive.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// How long any wait on a raw connection may take before the test fails (or, for
/// [`RawConn::closed`], reports it still open): generous, since it only bounds a hang and never
/// measures the edge.
const BOUND: Duration = Duration::from_secs(30);

/// One raw HTTP/1.1 connection carrying one `POST`, and every byte of the response read so far.
/// Dropping it closes the connection, as a client that goes away does.
pub struct RawConn {
    socket: TcpStream,
    got: Vec<u8>,
}

impl RawConn {
    /// Connects to `addr` and sends `body`, JSON, to `path` as the tenant of `key` (a bearer
    /// token), with `extra_headers` besides `host`, `authorization`, `content-type` and
    /// `content-length`. Reads nothing.
    pub async fn post(
        addr: impl ToSocketAddrs,
        path: &str,
        key: &str,
        extra_headers: &[(&str, &str)],
        body: &str,
    ) -> RawConn {
        let socket = TcpStream::connect(addr).await.expect("the edge accepts the connection");
        RawConn::post_over(socket, path, key, extra_headers, body).await
    }

    /// [`RawConn::post`] over `socket`, connected already (say from a `TcpSocket` with a small
    /// receive buffer).
    pub async fn post_over(
        mut socket: TcpStream,
        path: &str,
        key: &str,
        extra_headers: &[(&str, &str)],
        body: &str,
    ) -> RawConn {
        let extra: String = extra_headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: edge\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(request.as_bytes()).await.expect("the request is sent");
        RawConn { socket, got: Vec::new() }
    }

    /// Reads until what has arrived contains one of `markers`, and returns all of it. Fails the
    /// test, with what arrived, if the connection ends first or nothing matches within 30 s.
    pub async fn read_until(&mut self, markers: &[&str]) -> String {
        let got = &mut self.got;
        let socket = &mut self.socket;
        let read = async {
            let mut buf = [0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(got);
                if markers.iter().any(|m| text.contains(m)) {
                    return text.into_owned();
                }
                let n = socket.read(&mut buf).await.expect("reads");
                assert!(n > 0, "the connection stays open until {markers:?}: {text}");
                got.extend_from_slice(&buf[..n]);
            }
        };
        match tokio::time::timeout(BOUND, read).await {
            Ok(text) => text,
            Err(_) => panic!("none of {markers:?} within {BOUND:?}: {}", self.text()),
        }
    }

    /// Whether the edge has closed the connection (or reset it) yet, reading what is already
    /// there without waiting for more.
    pub async fn ended(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(1), self.socket.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(n)) => self.got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads until the edge closes the connection or resets it; false if it is still open after
    /// 30 s.
    pub async fn closed(&mut self) -> bool {
        let (got, socket) = (&mut self.got, &mut self.socket);
        let drained = async {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = socket.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(BOUND, drained).await.is_ok()
    }

    /// Everything up to the end of the response, which must end cleanly within 30 s.
    pub async fn read_to_end(mut self) -> String {
        tokio::time::timeout(BOUND, self.socket.read_to_end(&mut self.got))
            .await
            .unwrap_or_else(|_| panic!("the response ends within {BOUND:?}: {}", String::from_utf8_lossy(&self.got)))
            .expect("reads");
        self.text()
    }

    /// Everything read so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.got).into_owned()
    }
}
