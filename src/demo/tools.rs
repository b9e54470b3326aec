//! What the demo tools do, shared by the built-in server ([`super::lean`]) and the rmcp
//! reference server the tests run (`tests/common/rmcp_upstream.rs`), so both answer alike.

/// Largest `blob` the server makes: bounds its memory whatever a caller asks.
pub const MAX_BLOB_BYTES: u64 = 256 * 1024 * 1024;

/// Longest `sleep`: a slow tool for tests and benchmarks, never a stuck one.
pub const MAX_SLEEP_MS: u64 = 60_000;

/// `blob`'s size, or the tool error's text when it is over [`MAX_BLOB_BYTES`].
pub fn blob_size(size: u64) -> Result<u64, String> {
    if size > MAX_BLOB_BYTES {
        return Err(format!(
            "size {size} exceeds the maximum of {MAX_BLOB_BYTES} bytes"
        ));
    }
    Ok(size)
}

/// How long `sleep` waits, or the tool error's text when `ms` is over [`MAX_SLEEP_MS`].
pub fn sleep_time(ms: u64) -> Result<std::time::Duration, String> {
    if ms > MAX_SLEEP_MS {
        return Err(format!("ms {ms} exceeds the maximum of {MAX_SLEEP_MS}"));
    }
    Ok(std::time::Duration::from_millis(ms))
}

/// What `sleep` answers after waiting `ms`.
pub fn slept(ms: u64) -> String {
    format!("slept {ms} ms")
}

/// What `blob` text repeats.
const BLOB_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The bytes `blob` returns for `size`: a repeating alphabet, so a checksum is predictable.
pub fn blob_text(size: u64) -> String {
    let size = usize::try_from(size).expect("usize is 64 bits on the targets mcp-tunnel supports");
    let mut text = Vec::with_capacity(size + BLOB_ALPHABET.len());
    while text.len() < size {
        text.extend_from_slice(BLOB_ALPHABET);
    }
    text.truncate(size);
    String::from_utf8(text).expect("the alphabet is ASCII")
}

/// [`blob_text`] of `size` in pieces that share one buffer (a whole number of alphabets, about
/// 256 KiB), for a server that streams the text rather than building it.
pub fn blob_pieces(size: u64) -> impl Iterator<Item = bytes::Bytes> {
    /// Whole alphabets in a piece: 7,282 x 36 = 262,152 bytes.
    const ALPHABETS_PER_PIECE: usize = 7_282;
    static PIECE: std::sync::LazyLock<bytes::Bytes> =
        std::sync::LazyLock::new(|| bytes::Bytes::from(BLOB_ALPHABET.repeat(ALPHABETS_PER_PIECE)));
    let piece = PIECE.clone();
    let len = piece.len() as u64;
    let rest = usize::try_from(size % len).expect("below the piece's length");
    let last = (rest > 0).then(|| piece.slice(..rest));
    std::iter::repeat_n(piece, usize::try_from(size / len).unwrap_or(usize::MAX)).chain(last)
}
