//! A connection's outbound queue: shared frame chunks waiting for the socket.
//!
//! Chunks are `Bytes`, so a broadcast queued to a thousand members is a
//! thousand reference-count bumps, not a thousand copies. The queue keeps an
//! offset into its head chunk instead of shifting memory after a partial
//! write, and hands the socket many chunks per `writev`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// Most chunks handed to one `writev`; Linux accepts 1024, and 64 frames are
/// already far more than one socket buffer's worth of small messages.
const MAX_CHUNKS_PER_WRITE: usize = 64;

/// Chunk capacity kept after the queue empties; a spike's larger ring is given back.
const RETAINED_CHUNK_CAPACITY: usize = 8;

/// What happened to a frame offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued.
    Queued,
    /// A droppable frame arrived while the queue was above the soft mark.
    Dropped,
    /// Queued, and the queue is now above the hard mark: the connection must go.
    OverHard,
}

/// The two high-water marks of §8, in queued bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// Above this, room broadcasts are dropped.
    pub soft: usize,
    /// Above this, the connection is closed.
    pub hard: usize,
}

/// Bytes waiting to be written to one socket, in order.
#[derive(Debug, Default)]
pub struct OutboundQueue {
    chunks: VecDeque<Bytes>,
    /// Bytes of the head chunk already written.
    head_written: usize,
    /// Bytes queued and not yet written.
    queued: usize,
}

impl OutboundQueue {
    /// An empty queue; allocates nothing until the first frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing waits: the socket needs no WRITABLE interest.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Appends a chunk unconditionally (replies, control frames, HTTP responses).
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.queued += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// Appends a frame under the marks of §8: a droppable frame is refused above
    /// the soft mark; any frame that lifts the queue above the hard mark is
    /// reported so the caller can close the connection.
    pub fn offer(&mut self, chunk: Bytes, droppable: bool, marks: Marks) -> Offer {
        if droppable && self.queued > marks.soft {
            return Offer::Dropped;
        }
        self.push(chunk);
        if self.queued > marks.hard {
            Offer::OverHard
        } else {
            Offer::Queued
        }
    }

    /// Forgets everything queued (a connection crossing the hard mark), except
    /// the rest of a frame already partly written: cutting it would make the
    /// next frame's bytes part of its payload.
    pub fn clear(&mut self) {
        let partial = match self.chunks.pop_front() {
            Some(head) if self.head_written > 0 => {
                head.get(self.head_written..).map(Bytes::copy_from_slice)
            }
            _ => None,
        };
        self.chunks.clear();
        self.head_written = 0;
        self.queued = 0;
        self.shrink();
        if let Some(rest) = partial {
            self.push(rest);
        }
    }

    /// Writes as much as `writer` takes: repeated vectored writes until the
    /// queue is empty or the writer would block. Returns the bytes written;
    /// `WouldBlock` is not an error here, every other error is.
    pub fn write_to(&mut self, writer: &mut impl Write) -> io::Result<usize> {
        let mut total = 0;
        while !self.is_empty() {
            match self.write_once(writer) {
                Ok((0, _)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok((written, offered)) => {
                    total += written;
                    if written < offered {
                        // The socket's send buffer is full; its next writable
                        // edge says when to go on. Trying now would only
                        // return `WouldBlock`.
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(total)
    }

    /// One `writev` of up to `MAX_CHUNKS_PER_WRITE` chunks (a plain `send`
    /// when there is one: the socket call skips the VFS layer `writev` goes
    /// through). Returns the bytes written and the bytes offered.
    fn write_once(&mut self, writer: &mut impl Write) -> io::Result<(usize, usize)> {
        let mut slices = [IoSlice::new(&[]); MAX_CHUNKS_PER_WRITE];
        let mut count = 0;
        for (index, chunk) in self.chunks.iter().take(MAX_CHUNKS_PER_WRITE).enumerate() {
            let bytes = if index == 0 {
                chunk.get(self.head_written..).unwrap_or_default()
            } else {
                chunk.as_ref()
            };
            if let Some(slot) = slices.get_mut(index) {
                *slot = IoSlice::new(bytes);
                count = index + 1;
            }
        }
        let slices = slices.get(..count).unwrap_or_default();
        let offered = slices.iter().map(|slice| slice.len()).sum();
        let written = match slices {
            [only] => writer.write(only)?,
            _ => writer.write_vectored(slices)?,
        };
        self.consume(written);
        Ok((written, offered))
    }

    /// Drops `written` bytes from the front.
    fn consume(&mut self, mut written: usize) {
        self.queued -= written.min(self.queued);
        while written > 0 {
            let Some(head) = self.chunks.front() else {
                break;
            };
            let left = head.len() - self.head_written;
            if written >= left {
                written -= left;
                self.chunks.pop_front();
                self.head_written = 0;
            } else {
                self.head_written += written;
                written = 0;
            }
        }
        if self.chunks.is_empty() {
            self.shrink();
        }
    }

    fn shrink(&mut self) {
        if self.chunks.capacity() > RETAINED_CHUNK_CAPACITY {
            self.chunks.shrink_to(RETAINED_CHUNK_CAPACITY);
        }
    }

    /// Chunks queued (for tests and metrics).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The queued bytes, concatenated (for tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.queued);
        for (index, chunk) in self.chunks.iter().enumerate() {
            let start = if index == 0 { self.head_written } else { 0 };
            out.extend_from_slice(chunk.get(start..).unwrap_or_default());
        }
        out
    }
}

impl Write for OutboundQueue {
    /// tungstenite's automatic replies (pong, close) land here, in order with
    /// everything else the connection is sent; the queue never blocks.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.push(Bytes::copy_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `budget` bytes, then would block.
    struct Throttled {
        taken: Vec<u8>,
        budget: usize,
        calls: usize,
        /// Calls that came through `write` (one chunk) rather than `write_vectored`.
        plain_calls: usize,
    }

    impl Write for Throttled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.plain_calls += 1;
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut written = 0;
            for buf in bufs {
                let take = buf.len().min(self.budget);
                self.taken.extend_from_slice(&buf[..take]);
                self.budget -= take;
                written += take;
                if self.budget == 0 {
                    break;
                }
            }
            Ok(written)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const MARKS: Marks = Marks { soft: 10, hard: 20 };

    #[test]
    fn partial_writes_resume_mid_chunk_in_order() {
        let mut queue = OutboundQueue::new();
        queue.push(Bytes::from_static(b"hello "));
        queue.push(Bytes::from_static(b"world"));
        let mut writer = Throttled {
            taken: Vec::new(),
            budget: 3,
            calls: 0,
            plain_calls: 0,
        };
        assert_eq!(queue.write_to(&mut writer).unwrap(), 3);
        assert_eq!(queue.len(), 8);
        assert_eq!(queue.to_vec(), b"lo world");
        assert_eq!(
            writer.calls, 1,
            "a short write is not retried until writable"
        );
        writer.budget = 100;
        assert_eq!(queue.write_to(&mut writer).unwrap(), 8);
        assert_eq!(writer.taken, b"hello world");
        assert!(queue.is_empty());
        assert_eq!(writer.calls, 2);
    }

    #[test]
    fn many_chunks_go_out_in_few_calls() {
        let mut queue = OutboundQueue::new();
        for _ in 0..100 {
            queue.push(Bytes::from_static(b"0123456789"));
        }
        let mut writer = Throttled {
            taken: Vec::new(),
            budget: usize::MAX,
            calls: 0,
            plain_calls: 0,
        };
        queue.write_to(&mut writer).unwrap();
        assert_eq!(writer.taken.len(), 1000);
        assert_eq!(writer.calls, 2, "64 chunks per writev");
        assert_eq!(writer.plain_calls, 0);
    }

    #[test]
    fn a_lone_chunk_goes_out_with_a_plain_write() {
        let mut queue = OutboundQueue::new();
        queue.push(Bytes::from_static(b"frame"));
        let mut writer = Throttled {
            taken: Vec::new(),
            budget: usize::MAX,
            calls: 0,
            plain_calls: 0,
        };
        assert_eq!(queue.write_to(&mut writer).unwrap(), 5);
        assert_eq!((writer.calls, writer.plain_calls), (1, 1));
        assert!(queue.is_empty());
    }

    #[test]
    fn marks_drop_broadcasts_but_keep_replies() {
        let mut queue = OutboundQueue::new();
        assert_eq!(
            queue.offer(Bytes::from_static(&[0; 11]), true, MARKS),
            Offer::Queued
        );
        assert_eq!(
            queue.offer(Bytes::from_static(&[0; 5]), true, MARKS),
            Offer::Dropped
        );
        assert_eq!(
            queue.offer(Bytes::from_static(&[0; 5]), false, MARKS),
            Offer::Queued
        );
        assert_eq!(queue.len(), 16);
        assert_eq!(
            queue.offer(Bytes::from_static(&[0; 5]), false, MARKS),
            Offer::OverHard
        );
        queue.clear();
        assert!(queue.is_empty());
    }

    #[test]
    fn clearing_keeps_the_rest_of_a_half_written_frame() {
        let mut queue = OutboundQueue::new();
        queue.push(Bytes::from_static(b"frame-one"));
        queue.push(Bytes::from_static(b"frame-two"));
        let mut writer = Throttled {
            taken: Vec::new(),
            budget: 4,
            calls: 0,
            plain_calls: 0,
        };
        queue.write_to(&mut writer).unwrap();
        queue.clear();
        assert_eq!(queue.to_vec(), b"e-one");
        assert_eq!(queue.len(), 5);
        let mut untouched = OutboundQueue::new();
        untouched.push(Bytes::from_static(b"frame-one"));
        untouched.clear();
        assert!(untouched.is_empty());
    }

    #[test]
    fn memory_is_given_back_after_a_spike() {
        let mut queue = OutboundQueue::new();
        for _ in 0..1000 {
            queue.push(Bytes::from_static(b"x"));
        }
        let mut writer = Throttled {
            taken: Vec::new(),
            budget: usize::MAX,
            calls: 0,
            plain_calls: 0,
        };
        queue.write_to(&mut writer).unwrap();
        assert!(queue.chunks.capacity() <= RETAINED_CHUNK_CAPACITY);
    }

    #[test]
    fn write_errors_surface() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut queue = OutboundQueue::new();
        queue.push(Bytes::from_static(b"x"));
        assert!(queue.write_to(&mut Broken).is_err());
    }
}
