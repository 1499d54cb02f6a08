//! `/mesh/session/1`: request-response of opaque byte frames; and the tagged frames of
//! `/mesh/session-stream/1` ([`super::stream`]).
//!
//! One request and one response per stream, each a single frame: a 4-byte big-endian length
//! followed by that many bytes. The length is checked against the codec's maximum before any
//! byte of the body is read, and the body buffer grows only as bytes arrive, so a peer that
//! claims a large frame and sends little costs little memory. Time is bounded by the
//! request-response timeout ([`super::P2pConfig::request_timeout`]).

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;

/// The session protocol's name; listed in docs/protocol.md.
pub const SESSION_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh/session/1");

/// Hard upper bound on one frame (request or response): 64 MiB.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Reads one length-prefixed frame of at most `max` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame truncated at {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// Writes one length-prefixed frame, refusing one over `max` bytes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    data: &[u8],
    max: usize,
) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&l| l as usize <= max)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {} bytes exceeds the limit of {max}", data.len()),
            )
        })?;
    write_parts(io, &len.to_be_bytes(), data).await
}

/// Frames up to this size go out in one write: a yamux stream makes a frame of every
/// write, so a header written apart costs the connection a frame (and most often a
/// noise message and a syscall) of its own. Larger payloads are not copied.
const COALESCE_BYTES: usize = 64 << 10;

/// Writes `head` then `payload`, as one write when the payload is small, and flushes.
async fn write_parts<W: AsyncWrite + Unpin>(
    io: &mut W,
    head: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    if payload.len() <= COALESCE_BYTES {
        let mut frame = Vec::with_capacity(head.len() + payload.len());
        frame.extend_from_slice(head);
        frame.extend_from_slice(payload);
        io.write_all(&frame).await?;
    } else {
        io.write_all(head).await?;
        io.write_all(payload).await?;
    }
    io.flush().await
}

/// What a frame on a session stream ([`super::stream`]) carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// A session request, client to server.
    Request = 0,
    /// The answer to the request of the same id.
    Answer = 1,
    /// The server dropped the request of that id without an answer.
    Unanswered = 2,
    /// A session request that wants no answer (a push between servers): the server
    /// sends nothing back for it, whatever becomes of it.
    Notice = 3,
}

/// A stream frame's header before its payload: request id (8 bytes, big-endian), kind.
pub const TAG_BYTES: usize = 9;

/// Writes one stream frame: the 4-byte length of header and payload, the header
/// ([`TAG_BYTES`]), then the payload. Refused over `max` bytes of payload.
pub async fn write_tagged<W: AsyncWrite + Unpin>(
    io: &mut W,
    id: u64,
    kind: FrameKind,
    payload: &[u8],
    max: usize,
) -> io::Result<()> {
    let len = u32::try_from(payload.len() + TAG_BYTES)
        .ok()
        .filter(|_| payload.len() <= max)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes exceeds the limit of {max}",
                    payload.len()
                ),
            )
        })?;
    let mut head = [0u8; 4 + TAG_BYTES];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4..12].copy_from_slice(&id.to_be_bytes());
    head[12] = kind as u8;
    write_parts(io, &head, payload).await
}

/// Reads one stream frame of at most `max` bytes of payload: its id, kind and payload.
pub async fn read_tagged<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> io::Result<(u64, FrameKind, Vec<u8>)> {
    let mut frame = read_frame(io, max.saturating_add(TAG_BYTES)).await?;
    if frame.len() < TAG_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {} bytes is shorter than its header", frame.len()),
        ));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&frame[..8]);
    let kind = match frame[8] {
        0 => FrameKind::Request,
        1 => FrameKind::Answer,
        2 => FrameKind::Unanswered,
        3 => FrameKind::Notice,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown frame kind {other}"),
            ))
        }
    };
    frame.drain(..TAG_BYTES);
    Ok((u64::from_be_bytes(id), kind, frame))
}

/// The request-response codec for [`SESSION_PROTOCOL`]: opaque bytes both ways.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec accepting frames up to `max_frame` bytes (clamped to [`MAX_FRAME_BYTES`]).
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame.min(MAX_FRAME_BYTES),
        }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(MAX_FRAME_BYTES)
    }
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_frame).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_frame).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_frame).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_frame).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frame_roundtrip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello", 16).await.unwrap();
        assert_eq!(&buf[..4], &5u32.to_be_bytes());
        let got = read_frame(&mut Cursor::new(buf), 16).await.unwrap();
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn oversized_claim_is_rejected_before_reading_the_body() {
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend([0u8; 8]);
        let err = read_frame(&mut Cursor::new(bytes), MAX_FRAME_BYTES)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = write_frame(&mut Vec::new(), &[0u8; 17], 16)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn tagged_frames_round_trip_and_bad_headers_are_errors() {
        let mut buf = Vec::new();
        write_tagged(&mut buf, 7, FrameKind::Answer, b"abc", 16)
            .await
            .unwrap();
        assert_eq!(&buf[..4], &12u32.to_be_bytes());
        let got = read_tagged(&mut Cursor::new(buf), 16).await.unwrap();
        assert_eq!(got, (7, FrameKind::Answer, b"abc".to_vec()));

        let err = write_tagged(&mut Vec::new(), 1, FrameKind::Request, &[0u8; 17], 16)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // A frame too short for its header, and one of an unknown kind.
        let mut short = 3u32.to_be_bytes().to_vec();
        short.extend([0u8; 3]);
        let err = read_tagged(&mut Cursor::new(short), 16).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut unknown = 9u32.to_be_bytes().to_vec();
        unknown.extend([0u8; 8]);
        unknown.push(9);
        let err = read_tagged(&mut Cursor::new(unknown), 16)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// Counts the writes a frame takes.
    struct CountingWriter {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_small_frame_is_one_write_and_a_large_one_round_trips() {
        let mut small = CountingWriter {
            bytes: Vec::new(),
            writes: 0,
        };
        write_tagged(&mut small, 3, FrameKind::Notice, &[5u8; 2048], 1 << 20)
            .await
            .unwrap();
        assert_eq!(small.writes, 1, "header and payload in one write");
        let got = read_tagged(&mut Cursor::new(small.bytes), 1 << 20)
            .await
            .unwrap();
        assert_eq!(got, (3, FrameKind::Notice, vec![5u8; 2048]));

        let large: Vec<u8> = (0..COALESCE_BYTES + 7).map(|i| i as u8).collect();
        let mut big = CountingWriter {
            bytes: Vec::new(),
            writes: 0,
        };
        write_frame(&mut big, &large, 1 << 20).await.unwrap();
        assert_eq!(big.writes, 2, "a large payload is not copied");
        let got = read_frame(&mut Cursor::new(big.bytes), 1 << 20)
            .await
            .unwrap();
        assert_eq!(got, large);
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut bytes = 100u32.to_be_bytes().to_vec();
        bytes.extend([1u8; 10]);
        let err = read_frame(&mut Cursor::new(bytes), 1000).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(read_frame(&mut Cursor::new(vec![0u8, 1]), 1000)
            .await
            .is_err());
    }
}
