//! A hand-written HTTP/2 client over a plain `TcpStream`, for the abuse tests: it frames whatever
//! it is told to (a HEADERS frame without END_HEADERS followed by CONTINUATION frames forever,
//! a RST_STREAM right after each HEADERS, WINDOW_UPDATEs that overflow, ...), which a conforming
//! client such as the `h2` crate refuses to send.
//!
//! Frames (RFC 9113 §4.1): a 9-byte header (24-bit payload length, type, flags, 31-bit stream
//! id), then the payload. Header blocks (RFC 7541) use only "literal header field without
//! indexing — new name" with plain (non-Huffman) strings: no dynamic table state, trivial to
//! encode. Frames from the server are read whole; their header blocks are never decoded (the
//! tests look at frame types, stream ids, flags and error codes only).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The client connection preface's magic.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 9;
/// The initial (and smallest) SETTINGS_MAX_FRAME_SIZE: every peer accepts frames this large.
pub const MAX_FRAME: usize = 16_384;
/// Largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: u32 = 0x7fff_ffff;

/// Frame types (RFC 9113 §6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
}

/// Error codes (RFC 9113 §7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// The code's name, for messages.
    pub fn name(code: u32) -> &'static str {
        match code {
            NO_ERROR => "NO_ERROR",
            PROTOCOL_ERROR => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            REFUSED_STREAM => "REFUSED_STREAM",
            CANCEL => "CANCEL",
            COMPRESSION_ERROR => "COMPRESSION_ERROR",
            ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
            _ => "(other)",
        }
    }
}

/// SETTINGS parameters (RFC 9113 §6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
}

/// One frame: header fields and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payload under 2^24");
    assert!(len < 1 << 24, "payload under 2^24");
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & MAX_WINDOW).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn settings(params: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(params.len() * 6);
    for (id, value) in params {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(kind::SETTINGS, 0, 0, &payload)
}

pub fn settings_ack() -> Vec<u8> {
    frame(kind::SETTINGS, flag::ACK, 0, &[])
}

pub fn ping(data: [u8; 8]) -> Vec<u8> {
    frame(kind::PING, 0, 0, &data)
}

pub fn rst_stream(stream: u32, error: u32) -> Vec<u8> {
    frame(kind::RST_STREAM, 0, stream, &error.to_be_bytes())
}

/// A WINDOW_UPDATE; the increment is sent as given (0 and values over 2^31-1 included; the
/// reserved top bit is the receiver's to ignore).
pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(kind::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn data(stream: u32, end_stream: bool, payload: &[u8]) -> Vec<u8> {
    frame(kind::DATA, if end_stream { flag::END_STREAM } else { 0 }, stream, payload)
}

pub fn headers(stream: u32, block: &[u8], end_stream: bool, end_headers: bool) -> Vec<u8> {
    let mut flags = 0;
    if end_stream {
        flags |= flag::END_STREAM;
    }
    if end_headers {
        flags |= flag::END_HEADERS;
    }
    frame(kind::HEADERS, flags, stream, block)
}

pub fn continuation(stream: u32, block: &[u8], end_headers: bool) -> Vec<u8> {
    frame(kind::CONTINUATION, if end_headers { flag::END_HEADERS } else { 0 }, stream, block)
}

/// An HPACK integer with an `prefix`-bit prefix whose other (high) bits are `high` (RFC 7541 §5.1).
pub fn hpack_int(out: &mut Vec<u8>, value: usize, prefix: u32, high: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK string literal, not Huffman-coded.
pub fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, s.len(), 7, 0x00);
    out.extend_from_slice(s);
}

/// "Literal header field without indexing — new name" (RFC 7541 §6.2.2): 0x00, name, value.
pub fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_string(out, name.as_bytes());
    hpack_string(out, value);
}

/// The header block of a gRPC call of `path` (`/package.Service/Method`), with a bearer token
/// when given.
pub fn grpc_request_block(path: &str, token: Option<&str>) -> Vec<u8> {
    let mut block = Vec::new();
    hpack_literal(&mut block, ":method", b"POST");
    hpack_literal(&mut block, ":scheme", b"http");
    hpack_literal(&mut block, ":path", path.as_bytes());
    hpack_literal(&mut block, ":authority", b"127.0.0.1");
    hpack_literal(&mut block, "content-type", b"application/grpc");
    hpack_literal(&mut block, "te", b"trailers");
    if let Some(token) = token {
        hpack_literal(&mut block, "authorization", format!("Bearer {token}").as_bytes());
    }
    block
}

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(message.len()).expect("message under 4 GiB").to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A frame the server sent.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A GOAWAY's (last stream id, error code).
    pub fn goaway(&self) -> Option<(u32, u32)> {
        (self.kind == kind::GOAWAY && self.payload.len() >= 8)
            .then(|| (u32_at(&self.payload, 0) & MAX_WINDOW, u32_at(&self.payload, 4)))
    }

    /// A GOAWAY's debug data, as text.
    pub fn goaway_debug(&self) -> String {
        String::from_utf8_lossy(self.payload.get(8..).unwrap_or_default()).into_owned()
    }

    /// A RST_STREAM's error code.
    pub fn rst_code(&self) -> Option<u32> {
        (self.kind == kind::RST_STREAM && self.payload.len() == 4).then(|| u32_at(&self.payload, 0))
    }

    pub fn is_settings_ack(&self) -> bool {
        self.kind == kind::SETTINGS && self.flags & flag::ACK != 0
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Reads whole frames from the server.
pub struct FrameReader {
    read: OwnedReadHalf,
}

impl FrameReader {
    /// The next frame; `Ok(None)` at a clean end of the stream.
    pub async fn next(&mut self) -> io::Result<Option<Frame>> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        match self.read.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.read.read_exact(&mut payload).await?;
        Ok(Some(Frame { kind: head[3], flags: head[4], stream: u32_at(&head, 5) & MAX_WINDOW, payload }))
    }

    /// Reads until the server closes the connection (or the socket fails), acknowledging
    /// nothing. Returns the frames read, their GOAWAY (if any) and how the reading ended.
    pub async fn drain(&mut self) -> Drained {
        let mut drained = Drained::default();
        loop {
            match self.next().await {
                Ok(Some(frame)) => {
                    drained.count(&frame);
                }
                Ok(None) => return drained,
                Err(e) => {
                    drained.error = Some(e);
                    return drained;
                }
            }
        }
    }
}

/// What a connection's reader saw.
#[derive(Debug, Default)]
pub struct Drained {
    /// Frames read, by type (index = frame type, up to CONTINUATION).
    pub by_kind: [u64; 10],
    pub settings_acks: u64,
    pub ping_acks: u64,
    /// RST_STREAM frames, by error code (up to ENHANCE_YOUR_CALM; others in the last slot).
    pub resets: [u64; 14],
    /// The first GOAWAY: (last stream id, error code, debug data).
    pub goaway: Option<(u32, u32, String)>,
    /// The socket error that ended the reading, if it did not end cleanly.
    pub error: Option<io::Error>,
}

impl Drained {
    pub fn count(&mut self, frame: &Frame) {
        if let Some(slot) = self.by_kind.get_mut(usize::from(frame.kind)) {
            *slot += 1;
        }
        if frame.is_settings_ack() {
            self.settings_acks += 1;
        }
        if frame.kind == kind::PING && frame.flags & flag::ACK != 0 {
            self.ping_acks += 1;
        }
        if let Some(code) = frame.rst_code() {
            let slot = usize::try_from(code).unwrap_or(usize::MAX).min(self.resets.len() - 1);
            self.resets[slot] += 1;
        }
        if let (None, Some((last, code))) = (&self.goaway, frame.goaway()) {
            self.goaway = Some((last, code, frame.goaway_debug()));
        }
    }

    /// The GOAWAY's error code, if one came.
    pub fn goaway_code(&self) -> Option<u32> {
        self.goaway.as_ref().map(|g| g.1)
    }

    pub fn resets_with(&self, code: u32) -> u64 {
        self.resets[usize::try_from(code).unwrap_or(usize::MAX).min(self.resets.len() - 1)]
    }

    /// One line for the test's output.
    pub fn summary(&self) -> String {
        let goaway = match &self.goaway {
            Some((last, code, debug)) => {
                format!("GOAWAY {} (last stream {last}, debug {debug:?})", code::name(*code))
            }
            None => "no GOAWAY".to_string(),
        };
        format!(
            "{goaway}; frames by type {:?}; settings acks {}; ping acks {}; RST_STREAM by code {:?}; ended by {}",
            self.by_kind,
            self.settings_acks,
            self.ping_acks,
            self.resets,
            self.error.as_ref().map_or("EOF".to_string(), |e| e.to_string()),
        )
    }
}

/// A connection that has sent the preface and `params` as its SETTINGS. The server's SETTINGS
/// is neither read nor acknowledged: tests that want it acknowledged call [`handshake`].
pub async fn connect(addr: SocketAddr, params: &[(u16, u32)]) -> io::Result<(FrameReader, OwnedWriteHalf)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(&settings(params));
    write.write_all(&hello).await?;
    Ok((FrameReader { read }, write))
}

/// [`connect`], then reads the server's SETTINGS and acknowledges it (so the server's own
/// settings, such as its header list limit, are in force), returning the frames read on the
/// way.
pub async fn handshake(
    addr: SocketAddr,
    params: &[(u16, u32)],
) -> io::Result<(FrameReader, OwnedWriteHalf, Vec<Frame>)> {
    let (mut reader, mut write) = connect(addr, params).await?;
    let mut seen = Vec::new();
    loop {
        let frame = reader
            .next()
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed before SETTINGS"))?;
        let server_settings = frame.kind == kind::SETTINGS && frame.flags & flag::ACK == 0;
        seen.push(frame);
        if server_settings {
            write.write_all(&settings_ack()).await?;
            return Ok((reader, write, seen));
        }
    }
}

/// The value of `id` in a (non-ACK) SETTINGS frame's payload.
pub fn setting_value(frame: &Frame, id: u16) -> Option<u32> {
    if frame.kind != kind::SETTINGS || frame.flags & flag::ACK != 0 {
        return None;
    }
    frame.payload.chunks_exact(6).find_map(|p| {
        (u16::from_be_bytes([p[0], p[1]]) == id).then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
    })
}
