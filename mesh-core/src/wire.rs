//! The only place mesh turns values into bytes and back.
//!
//! Every message on the wire is one version byte ([`WIRE_VERSION`]) followed by the value in
//! bincode's standard configuration (little-endian, varint lengths). Decoding is bounded
//! twice before anything is allocated: the input must be at most `max_len` bytes, and bincode
//! runs with a byte limit ([`SMALL_LIMIT`] or [`FRAME_LIMIT`], whichever tier `max_len` falls
//! in, lowered to fit the input: see [`decode`]), so a length prefix that claims more than the
//! limit fails instead of allocating. Trailing bytes after the value are an error.
//!
//! ```
//! use mesh_core::wire;
//!
//! let bytes = wire::encode(&("tiny", 3u32)).unwrap();
//! let (name, n): (String, u32) = wire::decode(&bytes, 64).unwrap();
//! assert_eq!((name.as_str(), n), ("tiny", 3));
//! assert!(wire::decode::<(String, u32)>(&bytes, 2).is_err()); // over max_len
//! ```

use bincode::config::{self, Config};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first byte of every encoded message; bumped when the encoding changes incompatibly.
pub const WIRE_VERSION: u8 = 1;

/// Decode limit for control messages (heartbeats, DHT records, small requests): 1 MiB.
pub const SMALL_LIMIT: usize = 1 << 20;

/// Decode limit for the largest frame mesh accepts (tensor frames): 64 MiB.
pub const FRAME_LIMIT: usize = 64 << 20;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The input (or the encoded output) is longer than allowed.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The input has no version byte.
    #[error("empty message")]
    Empty,
    /// The version byte is not [`WIRE_VERSION`].
    #[error("unsupported wire version {found} (expected {expected})")]
    Version { found: u8, expected: u8 },
    /// bincode could not encode the value.
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// bincode could not decode the bytes (malformed, truncated or over the byte limit).
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The value ended before the input did.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// bincode with the smallest byte limit of at least `need` (the limit is a const generic,
/// hence the tiers, 8 apart or less so a limit is never far above `need`).
fn decode_limited<T: DeserializeOwned>(
    body: &[u8],
    need: usize,
) -> Result<(T, usize), bincode::error::DecodeError> {
    macro_rules! tiers {
        ($($limit:expr),+) => {{
            $(if need <= $limit {
                return bincode::serde::decode_from_slice(
                    body,
                    config::standard().with_limit::<{ $limit }>(),
                );
            })+
            bincode::serde::decode_from_slice(body, config::standard().with_limit::<FRAME_LIMIT>())
        }};
    }
    tiers!(4 << 10, 32 << 10, 256 << 10, SMALL_LIMIT, 8 << 20)
}

/// Encodes `value` as [`WIRE_VERSION`] followed by its bincode form.
///
/// Fails with [`WireError::TooLarge`] when the result would exceed [`FRAME_LIMIT`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![WIRE_VERSION];
    out.extend(bincode::serde::encode_to_vec(value, config::standard())?);
    if out.len() > FRAME_LIMIT {
        return Err(WireError::TooLarge {
            len: out.len(),
            max: FRAME_LIMIT,
        });
    }
    Ok(out)
}

/// Canonical bytes of `value`, for signing: what two peers must agree on byte for byte.
///
/// bincode 2.0.1's standard configuration with **fixed-width integers**, little-endian:
/// every integer is its full width (`u64` is 8 bytes), lengths of strings and sequences are
/// `u64`, enum variants are `u32`, `Option` is one tag byte. There is no version byte here:
/// signers put their own domain-separation prefix and version in front (see
/// `ledger::receipt`). This format is frozen; changing it breaks every stored signature, so
/// a new format gets a new function and a new signing domain instead.
pub fn canonical<T: Serialize>(value: &T) -> Result<Vec<u8>, WireError> {
    let out = bincode::serde::encode_to_vec(value, canonical_config())?;
    if out.len() > SMALL_LIMIT {
        return Err(WireError::TooLarge {
            len: out.len(),
            max: SMALL_LIMIT,
        });
    }
    Ok(out)
}

fn canonical_config() -> impl Config {
    config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// Bytes bincode may claim per input byte while decoding a well-formed message.
///
/// Through serde, bincode claims the bytes of every string and byte vector (which must all
/// be in the input) and the full width of every integer however short its varint: 8 bytes
/// for a one-byte `u64`, 16 for a `u128`. Sequences claim nothing up front.
const CLAIM_PER_BYTE: usize = 16;

/// Decodes a message written by [`encode`], refusing inputs longer than `max_len` bytes.
///
/// `max_len` above [`FRAME_LIMIT`] is clamped to it. The byte limit bincode runs with is
/// also the smallest of a few tiers that holds [`CLAIM_PER_BYTE`] × the input's length (at
/// least 4 KiB), so a tiny frame whose length prefix claims a 60 MiB string or byte vector
/// fails before allocating it: those get at most 128 bytes per input byte, or 4 KiB.
/// (serde itself preallocates at most 1 MiB for a sequence of claimed length.)
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, WireError> {
    match decode_extensible(bytes, max_len)? {
        (value, 0) => Ok(value),
        (_, trailing) => Err(WireError::TrailingBytes(trailing)),
    }
}

/// Encodes `value`, whose last field is a string that older peers do not know. When
/// `tail_empty`, that field's one byte (the empty string) is left off, so the bytes are
/// exactly what an older peer writes and strictly decodes.
pub fn encode_trimmed<T: Serialize>(value: &T, tail_empty: bool) -> Result<Vec<u8>, WireError> {
    let mut out = encode(value)?;
    if tail_empty && out.last() == Some(&0) {
        out.pop();
    }
    Ok(out)
}

/// Decodes what [`encode_trimmed`] wrote, and messages of newer peers that append fields
/// after it: bytes ending right before the last field read as that field empty (checked
/// by `tail_empty`), which is how an older peer's messages read.
pub fn decode_trimmed<T: DeserializeOwned>(
    bytes: &[u8],
    max_len: usize,
    tail_empty: impl Fn(&T) -> bool,
) -> Result<T, WireError> {
    let err = match decode_extensible(bytes, max_len) {
        Ok((value, _)) => return Ok(value),
        Err(e) => e,
    };
    if bytes.len() >= max_len.min(FRAME_LIMIT) {
        return Err(err);
    }
    let mut padded = Vec::with_capacity(bytes.len() + 1);
    padded.extend_from_slice(bytes);
    padded.push(0);
    match decode_extensible::<T>(&padded, max_len.saturating_add(1)) {
        Ok((value, 0)) if tail_empty(&value) => Ok(value),
        _ => Err(err),
    }
}

/// Like [`decode`], but bytes after the message are allowed and skipped; returns how many
/// there were. For messages that newer peers may extend by appending fields (heartbeats):
/// bincode is positional, so an older peer still reads every field it knows.
pub fn decode_extensible<T: DeserializeOwned>(
    bytes: &[u8],
    max_len: usize,
) -> Result<(T, usize), WireError> {
    let max = max_len.min(FRAME_LIMIT);
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version {
            found: version,
            expected: WIRE_VERSION,
        });
    }
    let tier = if max <= SMALL_LIMIT {
        SMALL_LIMIT
    } else {
        FRAME_LIMIT
    };
    let need = body.len().saturating_mul(CLAIM_PER_BYTE);
    let (value, used) = decode_limited(body, need.min(tier))?;
    Ok((value, body.len() - used))
}

// ---------------------------------------------------------------------------------------
// Tensors on the wire: a dtype and shape header, then raw little-endian element bytes.
// ---------------------------------------------------------------------------------------

/// Largest rank and element count a tensor frame may claim; checked before allocating.
pub const MAX_TENSOR_RANK: usize = 4;

/// Element types a tensor frame may carry (hidden states are float).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WireDType {
    F32,
    F16,
    BF16,
}

impl WireDType {
    fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::BF16 => 2,
        }
    }
}

/// A tensor as it travels: header (dtype, shape) and the raw little-endian bytes of its
/// elements in row-major order, written in bulk rather than as a serde sequence.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WireTensor {
    pub dtype: WireDType,
    pub shape: Vec<u32>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Why a tensor frame is not a valid tensor.
#[derive(Debug, thiserror::Error)]
pub enum TensorFrameError {
    /// The header claims a rank above [`MAX_TENSOR_RANK`] or a zero-sized dimension.
    #[error("tensor shape {0:?} is not allowed")]
    BadShape(Vec<u32>),
    /// The byte count does not match dtype × shape.
    #[error("tensor of shape {shape:?} needs {expected} bytes, frame has {actual}")]
    LengthMismatch {
        shape: Vec<u32>,
        expected: usize,
        actual: usize,
    },
    /// The tensor has a dtype that never travels (integers, f64).
    #[error("dtype {0:?} cannot travel on the wire")]
    UnsupportedDType(candle_core::DType),
    /// candle refused the conversion.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl WireTensor {
    /// Copy a tensor out to its little-endian bytes.
    pub fn from_tensor(t: &candle_core::Tensor) -> Result<Self, TensorFrameError> {
        use candle_core::DType;
        let shape = t.dims().iter().map(|&d| d as u32).collect();
        let flat = t.flatten_all()?;
        let (dtype, data) = match t.dtype() {
            DType::F32 => (
                WireDType::F32,
                flat.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                WireDType::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                WireDType::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            other => return Err(TensorFrameError::UnsupportedDType(other)),
        };
        Ok(Self { dtype, shape, data })
    }

    /// Rebuild the tensor on `device`, checking the header against the bytes first.
    pub fn to_tensor(
        &self,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor, TensorFrameError> {
        if self.shape.is_empty() || self.shape.len() > MAX_TENSOR_RANK || self.shape.contains(&0) {
            return Err(TensorFrameError::BadShape(self.shape.clone()));
        }
        let elems = self
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
            .ok_or_else(|| TensorFrameError::BadShape(self.shape.clone()))?;
        let expected = elems.saturating_mul(self.dtype.size());
        if expected != self.data.len() {
            return Err(TensorFrameError::LengthMismatch {
                shape: self.shape.clone(),
                expected,
                actual: self.data.len(),
            });
        }
        let dims: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let t = match self.dtype {
            WireDType::F32 => {
                let v: Vec<f32> = self
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                candle_core::Tensor::from_vec(v, dims, device)?
            }
            WireDType::F16 => {
                let v: Vec<half::f16> = self
                    .data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                candle_core::Tensor::from_vec(v, dims, device)?
            }
            WireDType::BF16 => {
                let v: Vec<half::bf16> = self
                    .data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                    .collect();
                candle_core::Tensor::from_vec(v, dims, device)?
            }
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        name: String,
        data: Vec<u8>,
        n: u64,
    }

    fn msg() -> Msg {
        Msg {
            name: "tiny".into(),
            data: vec![1, 2, 3],
            n: 42,
        }
    }

    #[test]
    fn canonical_is_fixed_width_and_stable() {
        // u64 as 8 LE bytes, string length as a u64, then the bytes: no varints.
        let bytes = canonical(&(1u64, "ab")).unwrap();
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']
        );
        assert_eq!(canonical(&msg()).unwrap(), canonical(&msg()).unwrap());
    }

    #[test]
    fn roundtrip() {
        let bytes = encode(&msg()).unwrap();
        assert_eq!(bytes[0], WIRE_VERSION);
        assert_eq!(decode::<Msg>(&bytes, 1024).unwrap(), msg());
    }

    #[test]
    fn rejects_over_max_len_wrong_version_trailing_and_empty() {
        let bytes = encode(&msg()).unwrap();
        assert!(matches!(
            decode::<Msg>(&bytes, bytes.len() - 1),
            Err(WireError::TooLarge { .. })
        ));
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert!(matches!(
            decode::<Msg>(&wrong, 1024),
            Err(WireError::Version { found: 9, .. })
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            decode::<Msg>(&long, 1024),
            Err(WireError::TrailingBytes(1))
        ));
        // Only where appended fields are expected are they skipped.
        let (skipped, extra) = decode_extensible::<Msg>(&long, 1024).unwrap();
        assert_eq!((skipped, extra), (msg(), 1));
        assert!(decode_extensible::<Msg>(&long, bytes.len()).is_err());
        assert!(matches!(decode::<Msg>(&[], 1024), Err(WireError::Empty)));
        assert!(decode::<Msg>(&bytes[..bytes.len() - 1], 1024).is_err());
    }

    #[test]
    fn huge_length_prefix_fails_without_allocating() {
        // A string that claims u64::MAX - 1 bytes, then a Vec claiming 2^40 bytes.
        let mut evil = vec![WIRE_VERSION, 0xfe];
        evil.extend(u64::MAX.to_le_bytes());
        assert!(decode::<Msg>(&evil, 1024).is_err());
        let mut evil = vec![WIRE_VERSION, 0x01, b'a', 0xfd];
        evil.extend((1u64 << 40).to_le_bytes());
        assert!(decode::<Msg>(&evil, FRAME_LIMIT * 4).is_err());
        // A string under the frame limit but far beyond what the input holds: refused by
        // the limit before allocating, not by running out of input after allocating 60 MiB.
        let mut evil = vec![WIRE_VERSION, 0xfc];
        evil.extend((60u32 << 20).to_le_bytes());
        assert!(matches!(
            decode::<Msg>(&evil, FRAME_LIMIT),
            Err(WireError::Decode(
                bincode::error::DecodeError::LimitExceeded
            ))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if i == 0 {
                        WIRE_VERSION
                    } else {
                        state as u8
                    }
                })
                .collect();
            let _ = decode::<Msg>(&bytes, 4096);
        }
    }
}
