//! Request-smuggling guard: notices a request head that carries both `Content-Length`
//! and `Transfer-Encoding`.
//!
//! hyper resolves that ambiguity itself (it drops `Content-Length` and reads the body as
//! chunked, per RFC 9112 §6.3), so the service never sees both headers. Till refuses such
//! requests outright (400 `bad_framing`, connection closed): it follows the request
//! stream alongside hyper — heads, `Content-Length` bodies, chunked bodies — and raises a
//! per-connection flag when a head carries both. It keeps following after a request with
//! `Upgrade` (Till refuses every upgrade, so the connection stays HTTP/1 and the next
//! request is checked too). Once it loses track (malformed input, a head larger than the
//! limit) it stops looking: hyper refuses malformed input on its own and closes the
//! connection, and the flag, once raised, stays raised. An HTTP/2 connection preface
//! stops it too: HTTP/2 frames its own messages and has no `Transfer-Encoding`.

/// Follows the bytes of one connection's request stream.
#[derive(Debug)]
pub struct FramingScanner {
    state: State,
    head: Vec<u8>,
    max_head: usize,
    flagged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// Skipping a `Content-Length` body.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize { size: u64, digits: bool, ext: bool },
    /// Skipping chunk data.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data.
    ChunkEnd,
    /// Reading trailer lines after the last chunk; `line_start` when at a line start.
    Trailer { line_start: bool },
    /// Not following anymore.
    Stopped,
}

impl FramingScanner {
    /// A scanner for a new connection; heads longer than `max_head` stop it.
    pub fn new(max_head: usize) -> Self {
        FramingScanner {
            state: State::Head,
            head: Vec::new(),
            max_head,
            flagged: false,
        }
    }

    /// True once a head with both `Content-Length` and `Transfer-Encoding` was seen.
    pub fn flagged(&self) -> bool {
        self.flagged
    }

    /// Feeds bytes read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Stopped => return,
                State::Head => {
                    let b = data[0];
                    data = &data[1..];
                    if self.head.is_empty() && (b == b'\r' || b == b'\n') {
                        continue; // empty lines before a request line are ignored
                    }
                    self.head.push(b);
                    if b == b'\n'
                        && (self.head.ends_with(b"\n\r\n") || self.head.ends_with(b"\n\n"))
                    {
                        self.state = self.end_of_head();
                        self.head.clear();
                    } else if self.head.len() > self.max_head {
                        self.state = State::Stopped;
                    }
                }
                State::Body(n) => {
                    let take = n.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = if take == n {
                        State::Head
                    } else {
                        State::Body(n - take)
                    };
                }
                State::ChunkSize { size, digits, ext } => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match b {
                        b'\n' if digits && size == 0 => State::Trailer { line_start: true },
                        b'\n' if digits => State::ChunkData(size),
                        b'\r' => State::ChunkSize { size, digits, ext },
                        _ if ext => State::ChunkSize { size, digits, ext },
                        b';' | b' ' | b'\t' if digits => State::ChunkSize {
                            size,
                            digits,
                            ext: true,
                        },
                        _ => match (b as char).to_digit(16) {
                            Some(d) => match size
                                .checked_mul(16)
                                .and_then(|s| s.checked_add(u64::from(d)))
                            {
                                Some(size) => State::ChunkSize {
                                    size,
                                    digits: true,
                                    ext,
                                },
                                None => State::Stopped,
                            },
                            None => State::Stopped,
                        },
                    };
                }
                State::ChunkData(n) => {
                    let take = n.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = if take == n {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(n - take)
                    };
                }
                State::ChunkEnd => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match b {
                        b'\r' => State::ChunkEnd,
                        b'\n' => State::ChunkSize {
                            size: 0,
                            digits: false,
                            ext: false,
                        },
                        _ => State::Stopped,
                    };
                }
                State::Trailer { line_start } => {
                    let b = data[0];
                    data = &data[1..];
                    self.state = match b {
                        b'\n' if line_start => State::Head,
                        b'\n' => State::Trailer { line_start: true },
                        b'\r' => State::Trailer { line_start },
                        _ => State::Trailer { line_start: false },
                    };
                }
            }
        }
    }

    fn end_of_head(&mut self) -> State {
        if self.head.starts_with(b"PRI * HTTP/2.0") {
            return State::Stopped;
        }
        let mut content_length: Option<Option<u64>> = None;
        let mut transfer_encoding = false;
        // Skip the request line.
        for line in self.head.split(|b| *b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let name = line[..colon].trim_ascii().to_ascii_lowercase();
            let value = line[colon + 1..].trim_ascii();
            match name.as_slice() {
                b"content-length" => {
                    let v = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok());
                    content_length = Some(v);
                }
                b"transfer-encoding" => transfer_encoding = true,
                _ => {}
            }
        }
        if content_length.is_some() && transfer_encoding {
            self.flagged = true;
            return State::Stopped;
        }
        match (transfer_encoding, content_length) {
            (true, _) => State::ChunkSize {
                size: 0,
                digits: false,
                ext: false,
            },
            (false, Some(Some(0))) | (false, None) => State::Head,
            (false, Some(Some(n))) => State::Body(n),
            (false, Some(None)) => State::Stopped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> FramingScanner {
        let mut s = FramingScanner::new(8192);
        for c in chunks {
            s.feed(c);
        }
        s
    }

    #[test]
    fn flags_cl_plus_te_in_either_order() {
        assert!(scan(&[b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"]).flagged());
        assert!(scan(&[
            b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n"
        ])
        .flagged());
    }

    #[test]
    fn follows_bodies_to_the_next_request() {
        let smuggle =
            b"POST /b HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        // After a Content-Length body.
        let s = scan(&[
            b"POST /a HTTP/1.1\r\nContent-Length: 26\r\n\r\n",
            b"Transfer-Encoding: chunked",
            smuggle,
        ]);
        assert!(s.flagged());
        // After a chunked body with extensions and trailers, byte by byte.
        let first: &[u8] =
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1A\r\nContent-Length: 1\r\nabcdefg\r\n0\r\nX-T: 1\r\n\r\n";
        let mut s = FramingScanner::new(8192);
        for b in first {
            s.feed(std::slice::from_ref(b));
        }
        assert!(!s.flagged());
        s.feed(smuggle);
        assert!(s.flagged());
    }

    /// Issue 10 item 1: an `Upgrade` request does not switch the guard off.
    #[test]
    fn keeps_following_after_an_upgrade_request() {
        let s = scan(&[
            b"GET /up/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"POST /up/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]);
        assert!(s.flagged());
        // Also with a body on the upgrade request.
        let s = scan(&[
            b"POST /up/ws HTTP/1.1\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /up/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        ]);
        assert!(s.flagged());
    }

    #[test]
    fn stops_at_an_http2_preface() {
        let mut s = scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        s.feed(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00transfer-encoding: chunked\r\ncontent-length: 1\r\n\r\n");
        assert!(!s.flagged());
    }

    #[test]
    fn ordinary_traffic_is_not_flagged() {
        let s = scan(&[
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"transfer-encoding\":1,\"content-length\":}",
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ]);
        assert!(!s.flagged());
    }
}
