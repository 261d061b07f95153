//! The few raw system calls the scenarios need for test setup (buffers to map, the iommufd
//! selftest command) that the engine itself has no use for.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `_IO(';', nr)`: the VFIO and iommufd ioctl numbers.
pub const fn io(nr: u32) -> libc::c_ulong {
    ((0x3b << 8) | nr) as libc::c_ulong
}

/// `ioctl(fd, request, arg)` with the errno as an error.
///
/// # Safety
/// `arg` must be the complete argument struct of `request`, with valid pointers in it.
pub unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees `arg` is the argument `request` expects.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// An anonymous, page-aligned mapping, unmapped on drop.
pub struct Buffer {
    /// Start of the mapping.
    pub ptr: *mut libc::c_void,
    /// Length in bytes.
    pub len: usize,
}

impl Buffer {
    /// A new zeroed mapping of `len` bytes.
    pub fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}
