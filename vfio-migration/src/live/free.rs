//! Freeing a migration's buffers off its critical path.
//!
//! Giving megabytes of buffers back to the system is not free: each one is unmapped a page
//! table at a time, and every other CPU running a thread of the process is told to forget the
//! pages. On a 2-CPU virtual machine, freeing the receiver's buffers of a 4-connection TLS
//! migration (about 20 MiB) took 1.4-3 ms, between the last chunk and LOADED: time the
//! devices stayed stopped. What a migration is done with goes to [`free_buffers`] instead.

/// Buffers of at least this many bytes in all are freed on a thread of their own.
const FREE_LATER: usize = 1 << 20;

/// Free `bufs`: on a short-lived thread of their own when they hold megabytes, so that the
/// caller does not wait for their memory to go back to the system; here otherwise (or when no
/// thread can be started).
pub(crate) fn free_buffers(bufs: Vec<Vec<u8>>) {
    if worth_a_thread(&bufs) {
        free_later(bufs);
    }
}

/// Whether `bufs` hold enough memory for a thread of their own to free them.
fn worth_a_thread(bufs: &[Vec<u8>]) -> bool {
    bufs.iter().map(Vec::capacity).sum::<usize>() >= FREE_LATER
}

/// Drop `what` on a short-lived thread of its own; when no thread can be started it is
/// dropped here.
fn free_later<T: Send + 'static>(what: T) {
    // On failure `spawn` drops the closure, and `what` in it, before it returns.
    let _ = std::thread::Builder::new()
        .name("vfio-mig-free".into())
        .spawn(move || drop(what));
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Tells its channel when it is dropped, and on which thread.
    struct Tell(mpsc::Sender<Option<String>>);

    impl Drop for Tell {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().name().map(str::to_string));
        }
    }

    #[test]
    fn what_is_handed_over_is_dropped_on_another_thread() {
        let (tx, rx) = mpsc::channel();
        free_later(Tell(tx));
        let on = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("dropped");
        assert_eq!(on.as_deref(), Some("vfio-mig-free"));
    }

    #[test]
    fn only_megabytes_are_worth_a_thread_to_free() {
        assert!(worth_a_thread(&[vec![0u8; FREE_LATER]]));
        assert!(worth_a_thread(&[vec![0u8; FREE_LATER / 2], vec![0u8; FREE_LATER / 2]]));
        assert!(!worth_a_thread(&vec![vec![0u8; 16]; 8]));
        assert!(!worth_a_thread(&[]));
    }
}
