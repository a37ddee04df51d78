//! Client sockets (TCP or Unix) and a reader that can give up.
//!
//! A connection thread blocked in `read` would never notice a shutdown, and a client that
//! stops sending halfway through a message would hold its thread forever. So sockets get a
//! short read timeout, and [`ClientReader`] turns the timeouts into two decisions: between
//! messages it returns when the server is stopping, and inside a message it gives up once
//! the client has sent nothing for a while.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a blocked read looks at the stop flag.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A client that sends nothing for this long in the middle of a message is dropped.
pub(crate) const STALL_LIMIT: Duration = Duration::from_secs(30);
/// The same limit once the server is stopping: shutdown should not wait long for a stuck
/// client.
pub(crate) const STALL_LIMIT_STOPPING: Duration = Duration::from_secs(3);
/// A reply not sent whole within this long drops its client (the default of
/// [`ServerConfig::reply_timeout`](super::ServerConfig::reply_timeout)); also the socket's
/// write timeout outside replies.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix domain socket connection.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the same socket (one reads, the other writes).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Sets blocking mode, the timeouts the server relies on, and no Nagle delay (replies are
    /// small and latency-bound).
    pub(crate) fn prepare(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(POLL_INTERVAL))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Stream::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(POLL_INTERVAL))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }

    /// Makes the socket non-blocking (a TLS session waits for it with `poll`).
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Shuts down both directions, which also wakes a thread blocked on the socket.
    pub fn shutdown(&self) {
        // The peer may already be gone; there is nothing to do about a failure here.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// Where a connection's replies go: a socket, or (for fuzzing) any writer.
pub trait ReplySink: Write + Send {
    /// Closes the connection both ways, so that a thread blocked on it wakes up; called once
    /// replies can no longer be sent.
    fn close(&self) {}

    /// Bounds how long one `write` may block (what is left of a reply's deadline).
    fn set_write_timeout(&self, _timeout: Duration) -> io::Result<()> {
        Ok(())
    }
}

impl ReplySink for Stream {
    fn close(&self) {
        self.shutdown();
    }

    fn set_write_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(timeout)),
            Stream::Unix(s) => s.set_write_timeout(Some(timeout)),
        }
    }
}

impl ReplySink for Vec<u8> {}

impl<W: ReplySink + ?Sized> ReplySink for &mut W {
    fn close(&self) {
        (**self).close();
    }

    fn set_write_timeout(&self, timeout: Duration) -> io::Result<()> {
        (**self).set_write_timeout(timeout)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// What happened when waiting for the next message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// The buffer holds a whole message.
    Message,
    /// The client closed the connection cleanly between messages.
    Closed,
    /// The server is stopping and no message had begun.
    Stopping,
}

/// Reads whole messages from a socket with a read timeout, watching the server's stop flag.
pub(crate) struct ClientReader<R> {
    inner: R,
    stop: Arc<AtomicBool>,
    /// Waiting for a message past this instant is an error (bounds the handshake).
    deadline: Option<Instant>,
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl<R: Read> ClientReader<R> {
    pub(crate) fn new(inner: R, stop: Arc<AtomicBool>) -> Self {
        ClientReader { inner, stop, deadline: None }
    }

    /// The reader's source, given back (to upgrade it to TLS).
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// From now on, waiting for a message past `deadline` fails; `None` waits for ever.
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Fails once the deadline has passed: a handshake dribbled a byte at a time ends on
    /// time as surely as one that sends nothing.
    fn check_deadline(&self) -> io::Result<()> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed waiting for the client"));
        }
        Ok(())
    }

    /// The server's stop flag.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Fills `buf` with the next message, or reports why none came. Only a message that has
    /// not begun is abandoned for a shutdown; one that has begun is read to its end.
    pub(crate) fn next_message(&mut self, buf: &mut [u8]) -> io::Result<Next> {
        loop {
            match self.inner.read(buf) {
                Ok(0) if !buf.is_empty() => return Ok(Next::Closed),
                Ok(n) => {
                    self.read_exact(&mut buf[n..])?;
                    return Ok(Next::Message);
                }
                Err(e) if timed_out(&e) => {
                    if self.stopping() {
                        return Ok(Next::Stopping);
                    }
                    self.check_deadline()?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills `buf`, the rest of a message already begun.
    pub(crate) fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        let mut last_progress = Instant::now();
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the client closed the connection mid-message",
                    ))
                }
                Ok(n) => {
                    filled += n;
                    last_progress = Instant::now();
                }
                Err(e) if timed_out(&e) => {
                    self.check_deadline()?;
                    let limit = if self.stopping() { STALL_LIMIT_STOPPING } else { STALL_LIMIT };
                    if last_progress.elapsed() >= limit {
                        return Err(io::Error::new(
                            ErrorKind::TimedOut,
                            format!("the client sent nothing for {limit:?} in the middle of a message"),
                        ));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and drops `len` bytes: a payload the server refuses still has to leave the
    /// stream for the next header to be found.
    pub(crate) fn discard(&mut self, mut len: u64) -> io::Result<()> {
        let mut sink = vec![0u8; len.min(64 * 1024) as usize];
        while len > 0 {
            let n = len.min(sink.len() as u64) as usize;
            self.read_exact(&mut sink[..n])?;
            len -= n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_messages_then_reports_a_clean_close() {
        let data: &[u8] = &[1, 2, 3, 4, 5, 6];
        let mut r = ClientReader::new(data, Arc::new(AtomicBool::new(false)));
        let mut buf = [0u8; 4];
        assert_eq!(r.next_message(&mut buf).unwrap(), Next::Message);
        assert_eq!(buf, [1, 2, 3, 4]);
        r.discard(1).unwrap();
        let mut one = [0u8; 1];
        assert_eq!(r.next_message(&mut one).unwrap(), Next::Message);
        assert_eq!(one, [6]);
        assert_eq!(r.next_message(&mut buf).unwrap(), Next::Closed);
    }

    #[test]
    fn a_truncated_message_is_an_error() {
        let data: &[u8] = &[1, 2];
        let mut r = ClientReader::new(data, Arc::new(AtomicBool::new(false)));
        let mut buf = [0u8; 4];
        assert_eq!(r.next_message(&mut buf).unwrap_err().kind(), ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_idle_socket_fails_after_the_deadline() {
        let (a, _b) = UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        s.prepare().unwrap();
        let mut r = ClientReader::new(s, Arc::new(AtomicBool::new(false)));
        r.set_deadline(Some(Instant::now() + Duration::from_millis(300)));
        let t = Instant::now();
        assert_eq!(r.next_message(&mut [0u8; 4]).unwrap_err().kind(), ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn an_idle_socket_returns_when_stopping() {
        let (a, _b) = UnixStream::pair().unwrap();
        let s = Stream::Unix(a);
        s.prepare().unwrap();
        let stop = Arc::new(AtomicBool::new(true));
        let mut r = ClientReader::new(s, stop);
        let mut buf = [0u8; 4];
        let t = Instant::now();
        assert_eq!(r.next_message(&mut buf).unwrap(), Next::Stopping);
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
