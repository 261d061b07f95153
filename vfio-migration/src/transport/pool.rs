//! Payload buffers handed between threads (the sender's producer and its connection writers,
//! the receiver's connection readers and its device loaders), recycled so that a migration
//! does not allocate (and fault in) a fresh buffer per chunk. A pool dropped with megabytes of
//! buffers frees them off the dropping thread ([`crate::live::free`]): the receiver drops its
//! pool before it tells the sender that everything is loaded, while the devices are stopped.

use std::sync::Mutex;

use crate::live::free::free_buffers;

/// A bounded stack of spare buffers.
#[derive(Debug)]
pub(crate) struct BufPool {
    spare: Mutex<Vec<Vec<u8>>>,
    /// Spare buffers kept at most (more are freed).
    keep: usize,
}

impl BufPool {
    /// A pool that keeps at most `keep` spare buffers.
    pub(crate) fn new(keep: usize) -> Self {
        Self {
            spare: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A spare buffer (its length and contents are whatever they were), or an empty one.
    pub(crate) fn take(&self) -> Vec<u8> {
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Give a buffer back for reuse.
    pub(crate) fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < self.keep {
            spare.push(buf);
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        free_buffers(std::mem::take(self.spare.get_mut().unwrap_or_else(|e| e.into_inner())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_up_to_the_bound() {
        let p = BufPool::new(1);
        assert_eq!(p.take().capacity(), 0, "nothing spare yet");
        let a = vec![7u8; 100];
        let cap = a.capacity();
        p.give(a);
        p.give(vec![0u8; 10]);
        let b = p.take();
        assert_eq!((b.len(), b.capacity()), (100, cap), "the first buffer back as it was");
        assert_eq!(p.take().capacity(), 0, "the second buffer was not kept");
    }
}
