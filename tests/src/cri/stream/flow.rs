//! SPDY/3.1 flow control: per-stream and per-session (stream 0) windows.
//!
//! Both start at 64 KiB. The sender subtracts every DATA payload from the stream's and the
//! session's window and may not send past either; the receiver hands the window back with
//! WINDOW_UPDATE frames as its application consumes the data. SETTINGS_INITIAL_WINDOW_SIZE
//! changes the initial size of stream windows (also of open streams, by the difference);
//! the session window is only ever changed by WINDOW_UPDATE on stream 0.
//!
//! Whether an exhausted window blocks our sends, and whether a peer that overruns our window
//! gets its stream reset, is the connection's [`FlowControl`] policy: the Kubernetes
//! streaming server (moby/spdystream) speaks SPDY/3 framing but implements no flow control
//! at all — it never sends WINDOW_UPDATE and ignores ours — so against it the windows are
//! tracked and updates are sent, but a strict sender would stall after 64 KiB.

/// Initial window of streams and of the session (SPDY/3.1).
pub const DEFAULT_WINDOW: u32 = 64 * 1024;
/// Largest window size (2^31 - 1).
pub const MAX_WINDOW: i64 = 0x7fff_ffff;

/// Flow control policy of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowControl {
    /// Block sends while the peer's window (stream or session) is exhausted, until its
    /// WINDOW_UPDATE arrives. Off for peers without flow control (spdystream).
    pub respect_peer_window: bool,
    /// Reset a stream (FLOW_CONTROL_ERROR) whose peer sends past our window. Off by default:
    /// spdystream does not track our window.
    pub enforce_own_window: bool,
    /// Our receive window for each stream and for the session; WINDOW_UPDATEs hand back
    /// consumed data once half a window has been read.
    pub receive_window: u32,
}

impl FlowControl {
    /// Full SPDY/3.1 flow control in both directions.
    pub fn strict() -> FlowControl {
        FlowControl {
            respect_peer_window: true,
            enforce_own_window: true,
            receive_window: DEFAULT_WINDOW,
        }
    }

    /// What works against the Kubernetes streaming server: windows tracked and updates sent,
    /// but neither side's window enforced.
    pub fn lenient() -> FlowControl {
        FlowControl {
            respect_peer_window: false,
            enforce_own_window: false,
            receive_window: DEFAULT_WINDOW,
        }
    }
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl::lenient()
    }
}

/// A window violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("WINDOW_UPDATE would grow the window past 2^31-1 ({0})")]
    Overflow(i64),
    #[error("the peer sent {0} bytes past the window")]
    Overrun(i64),
}

/// How much we may still send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWindow {
    avail: i64,
}

impl SendWindow {
    pub fn new(initial: u32) -> SendWindow {
        SendWindow {
            avail: initial as i64,
        }
    }

    /// Bytes that may be sent now (0 when the window is exhausted or negative).
    pub fn available(&self) -> usize {
        self.avail.max(0) as usize
    }

    /// The raw window (negative after a SETTINGS shrink below what was in flight).
    pub fn raw(&self) -> i64 {
        self.avail
    }

    /// `n` bytes were sent.
    pub fn consume(&mut self, n: usize) {
        self.avail -= n as i64;
    }

    /// A WINDOW_UPDATE of `delta`.
    pub fn grant(&mut self, delta: u32) -> Result<(), FlowError> {
        let next = self.avail + delta as i64;
        if next > MAX_WINDOW {
            return Err(FlowError::Overflow(next));
        }
        self.avail = next;
        Ok(())
    }

    /// SETTINGS_INITIAL_WINDOW_SIZE changed from `old` to `new`: open streams move by the
    /// difference.
    pub fn resize(&mut self, old: u32, new: u32) {
        self.avail += new as i64 - old as i64;
    }
}

/// What the peer may still send us, and what we owe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvWindow {
    initial: u32,
    avail: i64,
    unacked: u32,
}

impl RecvWindow {
    pub fn new(initial: u32) -> RecvWindow {
        RecvWindow {
            initial,
            avail: initial as i64,
            unacked: 0,
        }
    }

    /// What the peer may still send.
    pub fn available(&self) -> i64 {
        self.avail
    }

    /// `n` bytes arrived. An overrun is reported, and counted either way.
    pub fn receive(&mut self, n: usize) -> Result<(), FlowError> {
        self.avail -= n as i64;
        if self.avail < 0 {
            return Err(FlowError::Overrun(-self.avail));
        }
        Ok(())
    }

    /// The application consumed `n` bytes. Returns the WINDOW_UPDATE delta to send once at
    /// least half the initial window is owed (batching updates like common implementations).
    pub fn consume(&mut self, n: usize) -> Option<u32> {
        self.unacked = self.unacked.saturating_add(n.min(u32::MAX as usize) as u32);
        if self.unacked >= (self.initial / 2).max(1) {
            let delta = self.unacked.min(MAX_WINDOW as u32);
            self.unacked -= delta;
            self.avail += delta as i64;
            return Some(delta);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_window_blocks_and_reopens() {
        let mut w = SendWindow::new(DEFAULT_WINDOW);
        assert_eq!(w.available(), 65536);
        w.consume(65000);
        assert_eq!(w.available(), 536);
        w.consume(536);
        assert_eq!(w.available(), 0);
        w.grant(1000).expect("grant");
        assert_eq!(w.available(), 1000);
        assert_eq!(
            w.grant(u32::MAX >> 1),
            Err(FlowError::Overflow(1000 + (u32::MAX >> 1) as i64))
        );
        assert_eq!(w.available(), 1000, "a refused grant changes nothing");
    }

    #[test]
    fn settings_shrink_can_make_a_window_negative() {
        let mut w = SendWindow::new(DEFAULT_WINDOW);
        w.consume(60_000);
        w.resize(DEFAULT_WINDOW, 1024);
        assert_eq!(w.raw(), 1024 - 60_000);
        assert_eq!(w.available(), 0);
        w.grant(60_000).expect("grant");
        assert_eq!(w.available(), 1024);
    }

    #[test]
    fn receive_window_updates_after_half_a_window() {
        let mut w = RecvWindow::new(DEFAULT_WINDOW);
        w.receive(40_000).expect("within window");
        assert_eq!(w.consume(30_000), None, "less than half a window owed");
        assert_eq!(w.consume(10_000), Some(40_000));
        assert_eq!(w.available(), DEFAULT_WINDOW as i64);
        w.receive(65_536).expect("a full window");
        assert_eq!(w.receive(1), Err(FlowError::Overrun(1)));
        assert_eq!(w.consume(65_537), Some(65_537));
        assert_eq!(w.available(), DEFAULT_WINDOW as i64);
    }
}
