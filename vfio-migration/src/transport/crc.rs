//! CRC32C for records: the stream format's checksum ([`crate::stream::crc32c_append`], the
//! `crc-fast` crate, whose carry-less multiplication folding runs at memory speed on long inputs).

/// Payloads at least this long are checksummed block by block right after each block is copied
/// (see `Framed::copy`); below it the folding does not pay off and the stream format's copying
/// checksum is used as it is.
const FOLD_MIN: usize = 1024;

/// Whether `len` bytes are long enough for the block-wise copy-and-checksum of `Framed::copy`.
pub(crate) fn folds(len: usize) -> bool {
    len >= FOLD_MIN
}

/// The CRC32C of `data` appended to a message whose CRC32C is `crc` (0 for the empty message).
pub(crate) fn append(crc: u32, data: &[u8]) -> u32 {
    crate::stream::crc32c_append(crc, data)
}
