//! Length-delimited frames: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! The length is checked against a hard maximum *before* any allocation, so a peer cannot make
//! us buffer more than [`MAX_FRAME_LEN`] bytes, and every failure is a typed [`FrameError`].

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side accepts or sends. Control messages are small (a CSR or a
/// certificate is about 1 KiB); the cap leaves room for full peer-table resyncs later.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length exceeds the limit; the connection must be dropped because the
    /// stream can no longer be resynchronised.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame (after {got} of {expected} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced (4 for the header itself).
        expected: usize,
    },
    /// The bytes are not a message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
    /// Transport failure.
    #[error("transport error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one message as a frame (header + body). Fails only if the message would exceed the
/// limit, which is a bug on the sending side.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(FrameError::Malformed)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    // The length fits in u32 because it is at most MAX_FRAME_LEN.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes one message as a frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the stream ended before the first byte.
async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    expected: usize,
) -> Result<bool, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(FrameError::Truncated { got, expected });
        }
        got += n;
    }
    Ok(true)
}

/// Reads one raw frame body. `Ok(None)` means the peer finished the stream cleanly between
/// frames.
pub async fn read_frame_bytes<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    if !read_exact_or_eof(r, &mut header, 4).await? {
        return Ok(None);
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut body = vec![0u8; len];
    if !read_exact_or_eof(r, &mut body, len).await? && len > 0 {
        return Err(FrameError::Truncated {
            got: 0,
            expected: len,
        });
    }
    Ok(Some(body))
}

/// Reads and parses one message; parsing happens here, once, at the edge.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    match read_frame_bytes(r).await? {
        None => Ok(None),
        Some(body) => serde_json::from_slice(&body)
            .map(Some)
            .map_err(FrameError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ClientMsg, PROTOCOL_VERSION};

    #[tokio::test]
    async fn round_trip_and_limits() {
        let msg = ClientMsg::Hello {
            protocol_version: PROTOCOL_VERSION,
            software: "test".into(),
        };
        let bytes = encode(&msg).expect("encode");
        let mut r = &bytes[..];
        let back: ClientMsg = read_frame(&mut r).await.expect("read").expect("some");
        assert_eq!(back, msg);
        let end: Option<ClientMsg> = read_frame(&mut r).await.expect("eof");
        assert!(end.is_none());

        // oversize header is refused before allocation
        let huge = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let mut r = &huge[..];
        assert!(matches!(
            read_frame::<_, ClientMsg>(&mut r).await,
            Err(FrameError::TooLarge { .. })
        ));

        // truncated body
        let mut cut = bytes.clone();
        cut.truncate(bytes.len() - 3);
        let mut r = &cut[..];
        assert!(matches!(
            read_frame::<_, ClientMsg>(&mut r).await,
            Err(FrameError::Truncated { .. })
        ));

        // truncated header
        let mut r = &bytes[..2];
        assert!(matches!(
            read_frame::<_, ClientMsg>(&mut r).await,
            Err(FrameError::Truncated { .. })
        ));

        // garbage body
        let mut g = 5u32.to_be_bytes().to_vec();
        g.extend_from_slice(b"\xff{no}");
        let mut r = &g[..];
        assert!(matches!(
            read_frame::<_, ClientMsg>(&mut r).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
