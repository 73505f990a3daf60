//! A SPDY/3.1 client connection over a blocking socket.
//!
//! One reader thread decodes frames and updates the shared state (stream buffers, replies,
//! resets, windows, pings, GOAWAY); callers block on a condition variable with a deadline.
//! Writes go through one writer lock holding the socket's write half and the header
//! compressor, so frames (and their compressed header blocks) leave in encoding order; new
//! stream ids are allocated under that lock too, so they go out in increasing order as the
//! protocol requires. Lock order is always writer, then state.
//!
//! The peer's PINGs are answered, its SYN_STREAMs refused (RST_STREAM REFUSED_STREAM: a
//! remotecommand server never opens streams), its SETTINGS_INITIAL_WINDOW_SIZE and
//! WINDOW_UPDATEs applied, and its GOAWAY stops new streams. Consumed data is handed back
//! with WINDOW_UPDATEs (stream and session). See [`super::flow`] for the policy on windows.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Cursor, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::flow::{FlowControl, RecvWindow, SendWindow, DEFAULT_WINDOW};
use super::frame::{rst, settings, Decoder, Encoder, Frame};
use super::headers::Headers;
use super::StreamError;

/// Largest DATA payload we send in one frame.
pub const MAX_DATA_FRAME: usize = 16 * 1024;

/// A byte stream a connection can run on (TCP in real use; a socket pair in tests).
pub trait Socket: Read + Write + Send + Sync + 'static {
    fn try_clone_socket(&self) -> io::Result<Self>
    where
        Self: Sized;
    fn shutdown_both(&self);
    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout_opt(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

impl Socket for UnixStream {
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_opt(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

/// How a stream's receiving half ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The peer sent FIN.
    Fin,
    /// The peer reset the stream with this RST_STREAM status.
    Reset(u32),
    /// The connection ended (EOF, GOAWAY, I/O error) with the stream still open.
    ConnectionClosed(String),
}

/// Counters, for tests that check the protocol was really exercised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub frames_in: u64,
    pub data_bytes_in: u64,
    pub data_bytes_out: u64,
    pub pings_answered: u64,
    pub window_updates_in: u64,
    pub window_updates_out: u64,
    pub settings_in: u64,
    /// Bytes the peer sent past our receive window (it does not do flow control).
    pub peer_overrun_bytes: u64,
    /// Times a send waited for the peer's window.
    pub send_stalls: u64,
    pub goaway: Option<(u32, u32)>,
}

struct StreamState {
    reply: Option<Headers>,
    recv: VecDeque<u8>,
    end: Option<StreamEnd>,
    local_fin: bool,
    local_reset: bool,
    send: SendWindow,
    recv_window: RecvWindow,
}

struct State {
    streams: BTreeMap<u32, StreamState>,
    next_id: u32,
    next_ping: u32,
    pings: BTreeMap<u32, Option<Instant>>,
    session_send: SendWindow,
    session_recv: RecvWindow,
    peer_initial_window: u32,
    goaway_sent: bool,
    /// Why the reader stopped (EOF, error), once it has.
    closed: Option<String>,
    stats: ConnStats,
    generation: u64,
}

struct Writer {
    out: Box<dyn Write + Send>,
    encoder: Encoder,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    writer: Mutex<Writer>,
    flow: FlowControl,
    shutdown: Box<dyn Fn() + Send + Sync>,
}

/// A client connection. Dropping it sends GOAWAY, shuts the socket down and joins the
/// reader thread.
pub struct Connection {
    inner: Arc<Inner>,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    /// Starts a client connection on `sock`, whose first bytes (already read from it, e.g.
    /// after the HTTP upgrade response) are `leftover`.
    pub fn client<S: Socket>(
        sock: S,
        leftover: Vec<u8>,
        flow: FlowControl,
    ) -> Result<Connection, StreamError> {
        let read_half = sock.try_clone_socket().map_err(StreamError::Io)?;
        let shut = sock.try_clone_socket().map_err(StreamError::Io)?;
        read_half
            .set_read_timeout_opt(None)
            .map_err(StreamError::Io)?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                streams: BTreeMap::new(),
                next_id: 1,
                next_ping: 1,
                pings: BTreeMap::new(),
                session_send: SendWindow::new(DEFAULT_WINDOW),
                session_recv: RecvWindow::new(flow.receive_window),
                peer_initial_window: DEFAULT_WINDOW,
                goaway_sent: false,
                closed: None,
                stats: ConnStats::default(),
                generation: 0,
            }),
            changed: Condvar::new(),
            writer: Mutex::new(Writer {
                out: Box::new(sock),
                encoder: Encoder::new()?,
            }),
            flow,
            shutdown: Box::new(move || shut.shutdown_both()),
        });
        if flow.receive_window != DEFAULT_WINDOW {
            // Tell the peer our stream window; the session window is raised by WINDOW_UPDATE.
            inner.send(&Frame::Settings {
                clear: false,
                entries: vec![super::frame::Setting {
                    flags: 0,
                    id: settings::INITIAL_WINDOW_SIZE,
                    value: flow.receive_window,
                }],
            })?;
        }
        let reader_inner = Arc::clone(&inner);
        let reader = std::thread::Builder::new()
            .name("spdy-reader".into())
            .spawn(move || {
                let input = Cursor::new(leftover).chain(read_half);
                reader_loop(reader_inner, input)
            })
            .map_err(StreamError::Io)?;
        Ok(Connection {
            inner,
            reader: Some(reader),
        })
    }

    /// Opens a stream (SYN_STREAM) with `headers`; `fin` half-closes our side at once.
    pub fn open_stream(&self, headers: Headers, fin: bool) -> Result<u32, StreamError> {
        let mut w = self.inner.lock_writer();
        let id = {
            let mut st = self.inner.lock_state();
            if let Some(why) = &st.closed {
                return Err(StreamError::Closed(why.clone()));
            }
            if let Some((last, status)) = st.stats.goaway {
                return Err(StreamError::Closed(format!(
                    "the peer sent GOAWAY (last good stream {last}, status {status})"
                )));
            }
            if st.next_id > 0x7fff_ffff {
                return Err(StreamError::Protocol("stream ids exhausted".into()));
            }
            let id = st.next_id;
            st.next_id += 2;
            let initial = st.peer_initial_window;
            st.streams.insert(
                id,
                StreamState {
                    reply: None,
                    recv: VecDeque::new(),
                    end: None,
                    local_fin: fin,
                    local_reset: false,
                    send: SendWindow::new(initial),
                    recv_window: RecvWindow::new(self.inner.flow.receive_window),
                },
            );
            id
        };
        let frame = Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin,
            unidirectional: false,
            headers,
        };
        write_frame(&mut w, &frame)?;
        Ok(id)
    }

    /// Waits for the stream's SYN_REPLY.
    pub fn wait_reply(&self, id: u32, deadline: Instant) -> Result<Headers, StreamError> {
        self.inner
            .wait_until(deadline, &format!("SYN_REPLY for stream {id}"), |st| {
                let closed = st.closed.clone();
                let s = match st.streams.get(&id) {
                    Some(s) => s,
                    None => return Some(Err(unknown_stream(id))),
                };
                if let Some(h) = &s.reply {
                    return Some(Ok(h.clone()));
                }
                match &s.end {
                    Some(StreamEnd::Reset(status)) => Some(Err(StreamError::Reset {
                        stream: id,
                        status: *status,
                    })),
                    Some(StreamEnd::ConnectionClosed(why)) => {
                        Some(Err(StreamError::Closed(why.clone())))
                    }
                    _ => closed.map(|why| Err(StreamError::Closed(why))),
                }
            })
    }

    /// Sends `data` on the stream in DATA frames, waiting for the peer's window when the
    /// policy says so.
    pub fn write(&self, id: u32, data: &[u8], deadline: Instant) -> Result<(), StreamError> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.reserve_send(id, rest.len(), deadline)?;
            let frame = Frame::Data {
                stream_id: id,
                fin: false,
                data: rest[..n].to_vec(),
            };
            {
                let mut w = self.inner.lock_writer();
                write_frame(&mut w, &frame)?;
            }
            self.inner.lock_state().stats.data_bytes_out += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Takes up to `want` bytes (and at most one frame's worth) of send window.
    fn reserve_send(&self, id: u32, want: usize, deadline: Instant) -> Result<usize, StreamError> {
        let respect = self.inner.flow.respect_peer_window;
        let mut stalled = false;
        self.inner
            .wait_until(deadline, &format!("send window of stream {id}"), |st| {
                if let Some(why) = &st.closed {
                    return Some(Err(StreamError::Closed(why.clone())));
                }
                let session_avail = st.session_send.available();
                let s = match st.streams.get_mut(&id) {
                    Some(s) => s,
                    None => return Some(Err(unknown_stream(id))),
                };
                if s.local_fin || s.local_reset {
                    return Some(Err(StreamError::Protocol(format!(
                        "write on stream {id} after its sending half was closed"
                    ))));
                }
                if let Some(StreamEnd::Reset(status)) = s.end {
                    return Some(Err(StreamError::Reset { stream: id, status }));
                }
                let mut n = want.min(MAX_DATA_FRAME);
                if respect {
                    n = n.min(s.send.available()).min(session_avail);
                    if n == 0 {
                        if !stalled {
                            stalled = true;
                            st.stats.send_stalls += 1;
                        }
                        return None;
                    }
                }
                s.send.consume(n);
                st.session_send.consume(n);
                Some(Ok(n))
            })
    }

    /// Half-closes our side of the stream (empty DATA with FIN).
    pub fn close_write(&self, id: u32) -> Result<(), StreamError> {
        let mut w = self.inner.lock_writer();
        {
            let mut st = self.inner.lock_state();
            let s = st.streams.get_mut(&id).ok_or_else(|| unknown_stream(id))?;
            if s.local_fin || s.local_reset {
                return Ok(());
            }
            s.local_fin = true;
        }
        write_frame(
            &mut w,
            &Frame::Data {
                stream_id: id,
                fin: true,
                data: Vec::new(),
            },
        )
    }

    /// Resets the stream (RST_STREAM with `status`).
    pub fn reset(&self, id: u32, status: u32) -> Result<(), StreamError> {
        let mut w = self.inner.lock_writer();
        {
            let mut st = self.inner.lock_state();
            let s = st.streams.get_mut(&id).ok_or_else(|| unknown_stream(id))?;
            s.local_reset = true;
            if s.end.is_none() {
                s.end = Some(StreamEnd::Reset(status));
            }
        }
        write_frame(
            &mut w,
            &Frame::RstStream {
                stream_id: id,
                status,
            },
        )
    }

    /// Reads what the stream has buffered, waiting until something arrives or it ends.
    /// `Ok(None)` once it has ended and its buffer is empty.
    pub fn read(&self, id: u32, deadline: Instant) -> Result<Option<Vec<u8>>, StreamError> {
        let out = self
            .inner
            .wait_until(deadline, &format!("data on stream {id}"), |st| {
                let closed = st.closed.clone();
                let s = match st.streams.get_mut(&id) {
                    Some(s) => s,
                    None => return Some(Err(unknown_stream(id))),
                };
                if !s.recv.is_empty() {
                    let data: Vec<u8> = s.recv.drain(..).collect();
                    return Some(Ok(Some(data)));
                }
                if s.end.is_some() || closed.is_some() {
                    return Some(Ok(None));
                }
                None
            })?;
        if let Some(data) = &out {
            self.inner.consumed(id, data.len());
        }
        Ok(out)
    }

    /// Takes what the stream has buffered without waiting; the flag says whether it ended.
    pub fn try_read(&self, id: u32) -> Result<(Vec<u8>, bool), StreamError> {
        let (data, ended) = {
            let mut st = self.inner.lock_state();
            let closed = st.closed.is_some();
            let s = st.streams.get_mut(&id).ok_or_else(|| unknown_stream(id))?;
            let data: Vec<u8> = s.recv.drain(..).collect();
            (data, s.end.is_some() || closed)
        };
        if !data.is_empty() {
            self.inner.consumed(id, data.len());
        }
        Ok((data, ended))
    }

    /// How the stream's receiving half ended, if it has (connection end included).
    pub fn stream_end(&self, id: u32) -> Option<StreamEnd> {
        let st = self.inner.lock_state();
        let s = st.streams.get(&id)?;
        s.end.clone().or_else(|| {
            st.closed
                .as_ref()
                .map(|why| StreamEnd::ConnectionClosed(why.clone()))
        })
    }

    /// A counter that changes with every state change (frame received, connection end).
    pub fn generation(&self) -> u64 {
        self.inner.lock_state().generation
    }

    /// Waits until the state changes from `seen` (see [`Connection::generation`]) or the
    /// deadline passes; returns the new generation (equal to `seen` on timeout).
    pub fn wait_change(&self, seen: u64, deadline: Instant) -> u64 {
        let mut st = self.inner.lock_state();
        loop {
            if st.generation != seen {
                return st.generation;
            }
            let now = Instant::now();
            if now >= deadline {
                return st.generation;
            }
            st = match self.inner.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Sends a PING and waits for its echo; returns the round trip time.
    pub fn ping(&self, deadline: Instant) -> Result<Duration, StreamError> {
        let id = {
            let mut st = self.inner.lock_state();
            let id = st.next_ping;
            st.next_ping = st.next_ping.wrapping_add(2) & 0x7fff_ffff | 1;
            st.pings.insert(id, None);
            id
        };
        let start = Instant::now();
        self.inner.send(&Frame::Ping { id })?;
        let answered = self
            .inner
            .wait_until(deadline, &format!("PING {id} echo"), |st| {
                if let Some(Some(t)) = st.pings.get(&id) {
                    return Some(Ok(*t));
                }
                st.closed.clone().map(|why| Err(StreamError::Closed(why)))
            })?;
        self.inner.lock_state().pings.remove(&id);
        Ok(answered.saturating_duration_since(start))
    }

    /// Sends GOAWAY (we accept no peer streams, so the last good id is 0).
    pub fn go_away(&self) -> Result<(), StreamError> {
        {
            let mut st = self.inner.lock_state();
            if st.goaway_sent {
                return Ok(());
            }
            st.goaway_sent = true;
        }
        self.inner.send(&Frame::GoAway {
            last_good_stream_id: 0,
            status: 0,
        })
    }

    /// Whether the reader has stopped, and why.
    pub fn closed(&self) -> Option<String> {
        self.inner.lock_state().closed.clone()
    }

    pub fn stats(&self) -> ConnStats {
        self.inner.lock_state().stats.clone()
    }

    /// The peer's current send window for the stream and for the session (what we may send).
    pub fn send_windows(&self, id: u32) -> Option<(i64, i64)> {
        let st = self.inner.lock_state();
        st.streams
            .get(&id)
            .map(|s| (s.send.raw(), st.session_send.raw()))
    }

    /// Waits (up to `deadline`) for the peer to close the connection after GOAWAY.
    pub fn wait_closed(&self, deadline: Instant) -> Result<String, StreamError> {
        self.inner
            .wait_until(deadline, "the connection to close", |st| {
                st.closed.clone().map(Ok)
            })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.go_away();
        (self.inner.shutdown)();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn unknown_stream(id: u32) -> StreamError {
    StreamError::Protocol(format!("no stream {id} on this connection"))
}

fn write_frame(w: &mut Writer, frame: &Frame) -> Result<(), StreamError> {
    let bytes = w.encoder.encode(frame)?;
    w.out.write_all(&bytes).map_err(StreamError::Io)?;
    w.out.flush().map_err(StreamError::Io)
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, frame: &Frame) -> Result<(), StreamError> {
        let mut w = self.lock_writer();
        write_frame(&mut w, frame)
    }

    fn wait_until<T>(
        &self,
        deadline: Instant,
        what: &str,
        mut ready: impl FnMut(&mut State) -> Option<Result<T, StreamError>>,
    ) -> Result<T, StreamError> {
        let start = Instant::now();
        let mut st = self.lock_state();
        loop {
            if let Some(r) = ready(&mut st) {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StreamError::Timeout {
                    what: what.to_string(),
                    after: now - start,
                });
            }
            st = match self.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The application consumed `n` bytes of stream `id`: hand the window back. Best
    /// effort: once the peer is going away (GOAWAY, or it closed the socket after its last
    /// frames, as the streaming server does when a command ends) no updates are sent, and a
    /// failed send is not the reader's error — the connection's end reaches callers through
    /// the reader thread.
    fn consumed(&self, id: u32, n: usize) {
        let (stream_delta, session_delta) = {
            let mut st = self.lock_state();
            if st.closed.is_some() || st.stats.goaway.is_some() {
                return;
            }
            let session_delta = st.session_recv.consume(n);
            let stream_delta = match st.streams.get_mut(&id) {
                // No update for a stream whose peer half already ended.
                Some(s) if s.end.is_none() => s.recv_window.consume(n),
                _ => None,
            };
            let count = u64::from(stream_delta.is_some()) + u64::from(session_delta.is_some());
            st.stats.window_updates_out += count;
            (stream_delta, session_delta)
        };
        if let Some(delta) = session_delta {
            let _ = self.send(&Frame::WindowUpdate {
                stream_id: 0,
                delta,
            });
        }
        if let Some(delta) = stream_delta {
            let _ = self.send(&Frame::WindowUpdate {
                stream_id: id,
                delta,
            });
        }
    }
}

/// What the reader must write after handling a frame (outside the state lock).
enum Reply {
    None,
    Frame(Frame),
}

fn reader_loop(inner: Arc<Inner>, mut input: impl Read) {
    let mut decoder = Decoder::new();
    let why = loop {
        let frame = match decoder.read_frame(&mut input) {
            Ok(Some(f)) => f,
            Ok(None) => break "the peer closed the connection".to_string(),
            Err(e) => break format!("reading frames: {e}"),
        };
        let reply = {
            let mut st = inner.lock_state();
            st.stats.frames_in += 1;
            st.generation += 1;
            let r = handle(&inner.flow, &mut st, frame);
            inner.changed.notify_all();
            r
        };
        if let Reply::Frame(f) = reply {
            // A write failure shows up as the connection ending on the next read.
            let _ = inner.send(&f);
        }
    };
    let mut st = inner.lock_state();
    st.closed = Some(why);
    st.generation += 1;
    inner.changed.notify_all();
}

fn handle(flow: &FlowControl, st: &mut State, frame: Frame) -> Reply {
    match frame {
        Frame::SynReply {
            stream_id,
            fin,
            headers,
        } => {
            if let Some(s) = st.streams.get_mut(&stream_id) {
                if s.reply.is_none() {
                    s.reply = Some(headers);
                    if fin && s.end.is_none() {
                        s.end = Some(StreamEnd::Fin);
                    }
                } else {
                    // A second SYN_REPLY is a stream error.
                    s.end = Some(StreamEnd::Reset(rst::STREAM_IN_USE));
                    return Reply::Frame(Frame::RstStream {
                        stream_id,
                        status: rst::STREAM_IN_USE,
                    });
                }
            }
            Reply::None
        }
        Frame::Headers { stream_id, fin, .. } => {
            if let Some(s) = st.streams.get_mut(&stream_id) {
                if fin && s.end.is_none() {
                    s.end = Some(StreamEnd::Fin);
                }
            }
            Reply::None
        }
        Frame::Data {
            stream_id,
            fin,
            data,
        } => {
            st.stats.data_bytes_in += data.len() as u64;
            let mut overrun = 0i64;
            if st.session_recv.receive(data.len()).is_err() {
                overrun = overrun.max(-st.session_recv.available());
            }
            let Some(s) = st.streams.get_mut(&stream_id) else {
                return Reply::Frame(Frame::RstStream {
                    stream_id,
                    status: rst::INVALID_STREAM,
                });
            };
            if s.end.is_some() {
                // Data after FIN or reset: ignored (spdystream resets streams it has already
                // finished, so this is not worth a protocol error).
                return Reply::None;
            }
            if s.recv_window.receive(data.len()).is_err() {
                overrun = overrun.max(-s.recv_window.available());
            }
            if overrun > 0 && flow.enforce_own_window {
                s.end = Some(StreamEnd::Reset(rst::FLOW_CONTROL_ERROR));
                s.local_reset = true;
                return Reply::Frame(Frame::RstStream {
                    stream_id,
                    status: rst::FLOW_CONTROL_ERROR,
                });
            }
            s.recv.extend(data);
            if fin {
                s.end = Some(StreamEnd::Fin);
            }
            st.stats.peer_overrun_bytes = st.stats.peer_overrun_bytes.max(overrun.max(0) as u64);
            Reply::None
        }
        Frame::RstStream { stream_id, status } => {
            if let Some(s) = st.streams.get_mut(&stream_id) {
                if !matches!(s.end, Some(StreamEnd::Reset(_))) {
                    s.end = Some(StreamEnd::Reset(status));
                }
                s.local_reset = true;
            }
            Reply::None
        }
        Frame::Settings { entries, .. } => {
            st.stats.settings_in += 1;
            for e in entries {
                if e.id == settings::INITIAL_WINDOW_SIZE {
                    let old = st.peer_initial_window;
                    st.peer_initial_window = e.value;
                    for s in st.streams.values_mut() {
                        s.send.resize(old, e.value);
                    }
                }
            }
            Reply::None
        }
        Frame::WindowUpdate { stream_id, delta } => {
            st.stats.window_updates_in += 1;
            if stream_id == 0 {
                // An overflow of the session window is a session error; keep it saturated.
                if st.session_send.grant(delta).is_err() {
                    st.session_send = SendWindow::new(i32::MAX as u32);
                }
                return Reply::None;
            }
            match st.streams.get_mut(&stream_id) {
                Some(s) => match s.send.grant(delta) {
                    Ok(()) => Reply::None,
                    Err(_) => {
                        s.local_reset = true;
                        s.end = Some(StreamEnd::Reset(rst::FLOW_CONTROL_ERROR));
                        Reply::Frame(Frame::RstStream {
                            stream_id,
                            status: rst::FLOW_CONTROL_ERROR,
                        })
                    }
                },
                None => Reply::None,
            }
        }
        Frame::Ping { id } => {
            if id % 2 == 1 {
                // Our own (odd) ping came back.
                if let Some(slot) = st.pings.get_mut(&id) {
                    *slot = Some(Instant::now());
                }
                Reply::None
            } else {
                st.stats.pings_answered += 1;
                Reply::Frame(Frame::Ping { id })
            }
        }
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            st.stats.goaway = Some((last_good_stream_id, status));
            // Streams above the last one the peer processed were never seen by it.
            let why = format!(
                "the peer sent GOAWAY (last good stream {last_good_stream_id}, status {status})"
            );
            for (id, s) in st.streams.iter_mut() {
                if *id > last_good_stream_id && s.reply.is_none() && s.end.is_none() {
                    s.end = Some(StreamEnd::ConnectionClosed(why.clone()));
                }
            }
            Reply::None
        }
        Frame::SynStream { stream_id, .. } => Reply::Frame(Frame::RstStream {
            stream_id,
            status: rst::REFUSED_STREAM,
        }),
        Frame::Unknown { .. } => Reply::None,
    }
}

#[cfg(test)]
mod tests {
    //! The connection against a scripted peer on a socket pair: the test plays the server
    //! with the same encoder/decoder.

    use super::*;

    fn pair(flow: FlowControl) -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        b.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (Connection::client(a, Vec::new(), flow).expect("client"), b)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    struct Peer {
        sock: UnixStream,
        enc: Encoder,
        dec: Decoder,
    }

    impl Peer {
        fn new(sock: UnixStream) -> Peer {
            Peer {
                sock,
                enc: Encoder::new().expect("encoder"),
                dec: Decoder::new(),
            }
        }
        fn send(&mut self, f: Frame) {
            let b = self.enc.encode(&f).expect("encode");
            self.sock.write_all(&b).expect("write");
        }
        fn recv(&mut self) -> Frame {
            self.dec
                .read_frame(&mut self.sock)
                .expect("read")
                .expect("a frame")
        }
        /// The next frame that is not a WINDOW_UPDATE.
        fn recv_skip_updates(&mut self) -> Frame {
            loop {
                let f = self.recv();
                if !matches!(f, Frame::WindowUpdate { .. }) {
                    return f;
                }
            }
        }
    }

    fn stream_headers(t: &str) -> Headers {
        let mut h = Headers::new();
        h.set("streamType", t);
        h
    }

    #[test]
    fn streams_replies_data_fin_and_reset() {
        let (conn, sock) = pair(FlowControl::lenient());
        let mut peer = Peer::new(sock);
        let a = conn
            .open_stream(stream_headers("error"), false)
            .expect("open");
        let b = conn
            .open_stream(stream_headers("stdin"), false)
            .expect("open");
        assert_eq!((a, b), (1, 3), "client streams are odd and increasing");
        for want in [a, b] {
            match peer.recv() {
                Frame::SynStream {
                    stream_id, headers, ..
                } => {
                    assert_eq!(stream_id, want);
                    assert!(headers.get("streamtype").is_some());
                }
                f => panic!("want SYN_STREAM, got {f:?}"),
            }
            peer.send(Frame::SynReply {
                stream_id: want,
                fin: false,
                headers: Headers::new(),
            });
        }
        assert!(conn.wait_reply(a, soon()).expect("reply").is_empty());
        conn.wait_reply(b, soon()).expect("reply");

        conn.write(b, b"to the server", soon()).expect("write");
        conn.close_write(b).expect("half close");
        assert_eq!(
            peer.recv(),
            Frame::Data {
                stream_id: b,
                fin: false,
                data: b"to the server".to_vec()
            }
        );
        assert_eq!(
            peer.recv(),
            Frame::Data {
                stream_id: b,
                fin: true,
                data: Vec::new()
            }
        );
        assert!(conn.write(b, b"x", soon()).is_err(), "write after FIN");

        peer.send(Frame::Data {
            stream_id: a,
            fin: false,
            data: b"status".to_vec(),
        });
        peer.send(Frame::RstStream {
            stream_id: a,
            status: rst::CANCEL,
        });
        let mut got = Vec::new();
        while let Some(d) = conn.read(a, soon()).expect("read") {
            got.extend(d);
        }
        assert_eq!(got, b"status", "data before a reset is kept");
        assert_eq!(conn.stream_end(a), Some(StreamEnd::Reset(rst::CANCEL)));
    }

    #[test]
    fn pings_both_ways_and_goaway() {
        let (conn, sock) = pair(FlowControl::lenient());
        let mut peer = Peer::new(sock);
        // The peer's (even) ping is echoed.
        peer.send(Frame::Ping { id: 2 });
        assert_eq!(peer.recv(), Frame::Ping { id: 2 });
        // Our (odd) ping, echoed by the peer.
        let t = std::thread::spawn(move || {
            let f = peer.recv();
            assert!(matches!(f, Frame::Ping { id } if id % 2 == 1), "{f:?}");
            peer.send(f);
            peer
        });
        conn.ping(soon()).expect("ping answered");
        let mut peer = t.join().expect("peer thread");
        assert_eq!(conn.stats().pings_answered, 1);

        // A SYN_STREAM from the server is refused.
        peer.send(Frame::SynStream {
            stream_id: 2,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::new(),
        });
        assert_eq!(
            peer.recv(),
            Frame::RstStream {
                stream_id: 2,
                status: rst::REFUSED_STREAM
            }
        );

        peer.send(Frame::GoAway {
            last_good_stream_id: 0,
            status: 0,
        });
        let deadline = soon();
        while conn.stats().goaway.is_none() && Instant::now() < deadline {
            conn.wait_change(conn.generation(), deadline);
        }
        assert!(
            conn.open_stream(Headers::new(), false).is_err(),
            "no new streams after GOAWAY"
        );
        drop(peer);
        let why = conn.wait_closed(soon()).expect("closed");
        assert!(why.contains("closed"), "{why}");
    }

    #[test]
    fn strict_sender_waits_for_window_updates() {
        let (conn, sock) = pair(FlowControl::strict());
        let mut peer = Peer::new(sock);
        let id = conn
            .open_stream(stream_headers("stdin"), false)
            .expect("open");
        let _ = peer.recv();
        peer.send(Frame::SynReply {
            stream_id: id,
            fin: false,
            headers: Headers::new(),
        });
        conn.wait_reply(id, soon()).expect("reply");
        let conn = Arc::new(conn);
        let writer = {
            let conn = Arc::clone(&conn);
            std::thread::spawn(move || {
                let data = vec![7u8; 100_000];
                conn.write(id, &data, soon())
            })
        };
        // The first 64 KiB arrive, then the sender stalls.
        let mut got = 0usize;
        while got < DEFAULT_WINDOW as usize {
            match peer.recv() {
                Frame::Data { data, .. } => got += data.len(),
                f => panic!("unexpected {f:?}"),
            }
        }
        assert_eq!(got, DEFAULT_WINDOW as usize);
        let deadline = Instant::now() + Duration::from_millis(300);
        while conn.stats().send_stalls == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            conn.stats().send_stalls,
            1,
            "the sender waits for the window"
        );
        assert_eq!(conn.send_windows(id), Some((0, 0)));
        // Open the stream window only: still stalled on the session window.
        peer.send(Frame::WindowUpdate {
            stream_id: id,
            delta: 50_000,
        });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(conn.stats().data_bytes_out, DEFAULT_WINDOW as u64);
        peer.send(Frame::WindowUpdate {
            stream_id: 0,
            delta: 50_000,
        });
        while got < 100_000 {
            match peer.recv() {
                Frame::Data { data, .. } => got += data.len(),
                f => panic!("unexpected {f:?}"),
            }
        }
        writer.join().expect("writer").expect("write done");
        assert_eq!(got, 100_000);
        assert_eq!(
            conn.send_windows(id),
            Some((
                DEFAULT_WINDOW as i64 + 50_000 - 100_000,
                DEFAULT_WINDOW as i64 + 50_000 - 100_000
            ))
        );
    }

    #[test]
    fn settings_shrink_the_window_of_open_streams() {
        let (conn, sock) = pair(FlowControl::strict());
        let mut peer = Peer::new(sock);
        let id = conn
            .open_stream(stream_headers("stdin"), false)
            .expect("open");
        let _ = peer.recv();
        peer.send(Frame::SynReply {
            stream_id: id,
            fin: false,
            headers: Headers::new(),
        });
        peer.send(Frame::Settings {
            clear: false,
            entries: vec![super::super::frame::Setting {
                flags: 0,
                id: settings::INITIAL_WINDOW_SIZE,
                value: 10,
            }],
        });
        conn.wait_reply(id, soon()).expect("reply");
        let deadline = soon();
        while conn.stats().settings_in == 0 && Instant::now() < deadline {
            conn.wait_change(conn.generation(), deadline);
        }
        assert_eq!(conn.send_windows(id), Some((10, DEFAULT_WINDOW as i64)));
        let err = conn
            .write(
                id,
                b"more than ten bytes",
                Instant::now() + Duration::from_millis(200),
            )
            .expect_err("stalls after 10 bytes");
        assert!(matches!(err, StreamError::Timeout { .. }), "{err}");
        match peer.recv() {
            Frame::Data { data, .. } => assert_eq!(data, b"more than "),
            f => panic!("unexpected {f:?}"),
        }
    }

    #[test]
    fn receiver_sends_window_updates_and_enforces_its_window() {
        let (conn, sock) = pair(FlowControl::strict());
        let mut peer = Peer::new(sock);
        let id = conn
            .open_stream(stream_headers("stdout"), false)
            .expect("open");
        let _ = peer.recv();
        peer.send(Frame::SynReply {
            stream_id: id,
            fin: false,
            headers: Headers::new(),
        });
        conn.wait_reply(id, soon()).expect("reply");
        // 40000 bytes: more than half a window, so reading them earns updates.
        peer.send(Frame::Data {
            stream_id: id,
            fin: false,
            data: vec![1; 40_000],
        });
        let mut got = 0;
        while got < 40_000 {
            got += conn.read(id, soon()).expect("read").expect("data").len();
        }
        let mut updates = Vec::new();
        while updates.len() < 2 {
            match peer.recv() {
                Frame::WindowUpdate { stream_id, delta } => updates.push((stream_id, delta)),
                f => panic!("unexpected {f:?}"),
            }
        }
        updates.sort();
        assert_eq!(updates, [(0, 40_000), (id, 40_000)]);
        // Now overrun the window: 64 KiB + 1 unread bytes reset the stream.
        peer.send(Frame::Data {
            stream_id: id,
            fin: false,
            data: vec![2; DEFAULT_WINDOW as usize + 1],
        });
        assert_eq!(
            peer.recv_skip_updates(),
            Frame::RstStream {
                stream_id: id,
                status: rst::FLOW_CONTROL_ERROR
            }
        );
        assert_eq!(
            conn.stream_end(id),
            Some(StreamEnd::Reset(rst::FLOW_CONTROL_ERROR))
        );
    }

    #[test]
    fn lenient_receiver_accepts_an_overrun() {
        let (conn, sock) = pair(FlowControl::lenient());
        let mut peer = Peer::new(sock);
        let id = conn
            .open_stream(stream_headers("stdout"), false)
            .expect("open");
        let _ = peer.recv();
        peer.send(Frame::SynReply {
            stream_id: id,
            fin: false,
            headers: Headers::new(),
        });
        peer.send(Frame::Data {
            stream_id: id,
            fin: true,
            data: vec![3; 100_000],
        });
        let mut got = 0;
        while let Some(d) = conn.read(id, soon()).expect("read") {
            got += d.len();
        }
        assert_eq!(got, 100_000);
        assert_eq!(
            conn.stats().peer_overrun_bytes,
            100_000 - DEFAULT_WINDOW as u64
        );
        assert_eq!(conn.stream_end(id), Some(StreamEnd::Fin));
    }

    #[test]
    fn timeouts_are_reported() {
        let (conn, _sock) = pair(FlowControl::lenient());
        let id = conn
            .open_stream(stream_headers("error"), false)
            .expect("open");
        let err = conn
            .wait_reply(id, Instant::now() + Duration::from_millis(50))
            .expect_err("no reply");
        assert!(matches!(err, StreamError::Timeout { .. }), "{err}");
        let err = conn
            .read(id, Instant::now() + Duration::from_millis(50))
            .expect_err("no data");
        assert!(matches!(err, StreamError::Timeout { .. }), "{err}");
    }
}
