//! Bytes read eight at a time, as one machine word (little-endian): how the short strings
//! of a request are scanned (a header name, a tenant id, a JSON string).

/// `0x01` in every byte.
pub(crate) const ONES: u64 = u64::from_le_bytes([1; 8]);
/// The high bit of every byte.
pub(crate) const HIGH_BITS: u64 = ONES << 7;

/// The eight bytes of `bytes` from `at` on, as a word; `bytes` must hold them.
#[inline(always)]
pub(crate) fn word(bytes: &[u8], at: usize) -> u64 {
    let eight: [u8; 8] = bytes[at..at + 8].try_into().expect("eight bytes");
    u64::from_le_bytes(eight)
}
