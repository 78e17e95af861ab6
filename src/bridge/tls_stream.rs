//! The worker listener's TLS stream: rustls' unbuffered API over a TCP
//! socket, with buffers that exist only while bytes are in them.
//!
//! tokio-rustls drives rustls' buffered connection, whose record buffer is
//! 4 KiB from the first read on and never shrinks: 4 KiB of every idle
//! worker connection, which is most of a bridge's memory at 100,000 browser
//! tabs. Here the socket is read only once it is readable, into a buffer
//! taken then (see [`buffer`]); what is left over is a partial record, and
//! a buffer with nothing in it is given back. Decrypted bytes go straight
//! into the reader's buffer, and only what does not fit is kept. Encrypted
//! bytes wait in a buffer of their own until the socket takes them: a write
//! waits while any do, and takes at most [`WRITE_SIZE`] bytes.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll, Waker},
};

use rustls::{
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{
        ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
    },
    ServerConfig,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

mod buffer;

use buffer::Buffer;

/// Room made for each read from the socket: at least one whole TLS record
/// (16 KiB of data plus a TLS 1.3 record's largest overhead and its head).
/// A read takes what the buffer has room for, up to [`buffer::SIZE`].
const RECORD_WIRE: usize = 5 + 16 * 1024 + 256;

/// Most plaintext bytes one write takes: two records, which fit a pooled
/// buffer once encrypted.
const WRITE_SIZE: usize = 2 * RECORD_DATA;

/// Slices at least this long are encrypted where they are; shorter ones
/// are gathered first, so that a batch of small frames becomes one record
/// rather than a record per frame head and payload.
const GATHER_BELOW: usize = 4 * 1024;

/// Most plaintext bytes in one record.
const RECORD_DATA: usize = 16 * 1024;

/// A server-side TLS stream over a TCP socket.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Bytes read from the socket and not yet processed: a partial record.
    incoming: Buffer,
    /// Decrypted bytes the reader has not taken yet.
    plain: Buffer,
    /// Encrypted bytes the socket has not taken yet.
    outgoing: Buffer,
    /// The peer has ended its side: reads end once `plain` is empty.
    read_closed: bool,
    /// Our close_notify is queued.
    write_closed: bool,
    /// The reader, if it waits for the socket while the writer may decrypt
    /// bytes for it (a record completed while the writer ran rustls).
    reader: Option<Waker>,
}

/// Where rustls stopped.
#[derive(Debug, PartialEq, Eq)]
enum Rest {
    /// Application data may be written.
    Writable,
    /// More bytes from the peer are needed.
    Blocked,
    /// Both sides have closed.
    Closed,
}

/// Called with the state that lets data be encrypted, and the buffer of
/// encrypted bytes to append to.
type Encrypt<'f> =
    &'f mut dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Buffer) -> io::Result<()>;

fn tls_error(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Runs the server side of a TLS handshake on `tcp`.
pub(crate) async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        tcp,
        conn,
        incoming: Buffer::default(),
        plain: Buffer::default(),
        outgoing: Buffer::default(),
        read_closed: false,
        write_closed: false,
        reader: None,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl TlsStream {
    /// The peer's certificate chain, if it sent one.
    pub(crate) fn peer_certificates(
        &self,
    ) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let rest = self.process(None, None)?;
            ready!(self.poll_send(cx))?;
            match rest {
                Rest::Writable => return Poll::Ready(Ok(())),
                Rest::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Rest::Blocked if self.read_closed => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
                }
                Rest::Blocked => ready!(self.poll_fill(cx))?,
            }
        }
    }

    /// Runs rustls over the bytes received until it needs more or data
    /// may be written. Decrypted data goes to `dst` while it has room and
    /// nothing is kept before it, else to `plain`; rustls' own messages
    /// (handshake, tickets, key updates, alerts) to `outgoing`. `encrypt`
    /// is called once, if data may be written.
    fn process(
        &mut self,
        mut dst: Option<&mut ReadBuf<'_>>,
        mut encrypt: Option<Encrypt<'_>>,
    ) -> io::Result<Rest> {
        let mut woke = false;
        loop {
            let Self {
                conn,
                incoming,
                plain,
                outgoing,
                read_closed,
                ..
            } = self;
            let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming.data_mut());
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.queue_alert();
                    return Err(tls_error(e));
                }
            };
            let rest = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let mut data = record.map_err(tls_error)?.payload;
                        if let Some(dst) = dst.as_deref_mut().filter(|_| plain.is_empty()) {
                            let n = data.len().min(dst.remaining());
                            dst.put_slice(&data[..n]);
                            data = &data[n..];
                        }
                        if !data.is_empty() {
                            plain.extend(data);
                            woke = true;
                        }
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut message) => {
                    encode(&mut message, outgoing)?;
                    None
                }
                // What is encoded waits in `outgoing`, in order, for the
                // socket; rustls need not know when it has gone.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    *read_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Rest::Closed),
                ConnectionState::BlockedHandshake => Some(Rest::Blocked),
                ConnectionState::WriteTraffic(mut traffic) => {
                    if let Some(encrypt) = encrypt.take() {
                        encrypt(&mut traffic, outgoing)?;
                    }
                    Some(Rest::Writable)
                }
                // Early data is not enabled (the config's default), and
                // future states are not ours to guess at.
                _ => return Err(io::Error::other("unexpected TLS state")),
            };
            self.incoming.consume(discard);
            if let Some(rest) = rest {
                if woke && dst.is_none() {
                    if let Some(reader) = self.reader.take() {
                        reader.wake();
                    }
                }
                return Ok(rest);
            }
        }
    }

    /// After a TLS error: the alert rustls queued for the peer goes into
    /// `outgoing`, to be sent if the socket takes it.
    fn queue_alert(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut message)) = state {
            let _ = encode(&mut message, &mut self.outgoing);
            let _ = self.send_now();
        }
    }

    /// Writes what the socket takes of `outgoing` now, without waiting: for
    /// the reader's side, which must not wait to write. A task waiting for
    /// the socket to be writable is the one woken when it is, so only the
    /// writer's side waits (in [`TlsStream::poll_send`]).
    fn send_now(&mut self) -> io::Result<()> {
        while !self.outgoing.is_empty() {
            match self.tcp.try_write(self.outgoing.data()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.outgoing.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the socket has into `incoming`, made when the socket is
    /// readable rather than before.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read(self.incoming.room(RECORD_WIRE)) {
                Ok(0) => {
                    self.read_closed = true;
                    if !self.incoming.is_empty() {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    self.incoming.filled(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.incoming.release_if_empty(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Writes `outgoing` to the socket; ready once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            self.send_now()?;
            if self.outgoing.is_empty() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    /// Encrypts up to [`WRITE_SIZE`] bytes of `bufs`; returns how many.
    fn encrypt(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut taken = 0;
        let mut write = |traffic: &mut WriteTraffic<'_, ServerConnectionData>, out: &mut Buffer| {
            let mut gathered = Vec::new();
            for buf in bufs {
                let room = WRITE_SIZE - taken;
                if room == 0 {
                    break;
                }
                let data = &buf[..buf.len().min(room)];
                taken += data.len();
                if data.len() >= GATHER_BELOW {
                    seal(traffic, &gathered, out)?;
                    gathered.clear();
                    seal(traffic, data, out)?;
                    continue;
                }
                if gathered.len() + data.len() > RECORD_DATA {
                    seal(traffic, &gathered, out)?;
                    gathered.clear();
                }
                gathered.extend_from_slice(data);
            }
            seal(traffic, &gathered, out)
        };
        match self.process(None, Some(&mut write))? {
            Rest::Writable => Ok(taken),
            Rest::Blocked | Rest::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

/// Appends a message of rustls' own (handshake, ticket, key update, alert)
/// to `out`.
fn encode(
    message: &mut EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Buffer,
) -> io::Result<()> {
    append(out, 512, |room| match message.encode(room) {
        Ok(n) => Ok(Ok(n)),
        Err(EncodeError::InsufficientSize(e)) => Ok(Err(e.required_size)),
        Err(e) => Err(tls_error(e)),
    })
}

/// Encrypts `data` onto the end of `out`.
fn seal(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    data: &[u8],
    out: &mut Buffer,
) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    // Each record adds at most 29 bytes (a TLS 1.2 AES-GCM record's head,
    // nonce and tag; TLS 1.3 adds 22).
    let records = data.len().div_ceil(RECORD_DATA);
    append(out, data.len() + records * 32, |room| {
        match traffic.encrypt(data, room) {
            Ok(n) => Ok(Ok(n)),
            Err(EncryptError::InsufficientSize(e)) => Ok(Err(e.required_size)),
            Err(e) => Err(tls_error(e)),
        }
    })
}

/// Appends what `write` puts into the room it is given at the end of
/// `out`, at least `room` bytes at first; `write` answers `Ok(Err(n))` when
/// it needs `n` bytes of room.
fn append(
    out: &mut Buffer,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> io::Result<Result<usize, usize>>,
) -> io::Result<()> {
    loop {
        let space = out.room(room);
        let offered = space.len();
        match write(space)? {
            Ok(n) => {
                out.filled(n);
                return Ok(());
            }
            Err(needed) if needed > offered => room = needed,
            Err(_) => return Err(io::Error::other("TLS buffer size refused")),
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain.data()[..n]);
                this.plain.consume(n);
                return Poll::Ready(Ok(()));
            }
            this.process(Some(buf), None)?;
            if buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
            if !this.plain.is_empty() {
                continue;
            }
            // What rustls answered (a key update, say) goes out now if the
            // socket takes it, else with the next write.
            this.send_now()?;
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if !this
                .reader
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                this.reader = Some(cx.waker().clone());
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Encrypted bytes wait in one pooled buffer: what the last write
        // left goes first.
        ready!(this.poll_send(cx))?;
        let n = this.encrypt(bufs)?;
        // Sent at once if the socket takes it; what it does not goes with
        // the flush or the next write.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            let mut close = |traffic: &mut WriteTraffic<'_, ServerConnectionData>,
                             out: &mut Buffer| {
                append(out, 64, |room| match traffic.queue_close_notify(room) {
                    Ok(n) => Ok(Ok(n)),
                    Err(EncryptError::InsufficientSize(e)) => Ok(Err(e.required_size)),
                    Err(e) => Err(tls_error(e)),
                })
            };
            // A stream whose peer closed both ways already has nothing to
            // close.
            let _ = this.process(None, Some(&mut close))?;
            this.write_closed = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{future::poll_fn, time::Duration};

    use rustls::pki_types::ServerName;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };
    use tokio_rustls::{client, TlsConnector};

    use super::*;
    use crate::tls::SelfSigned;

    type Client = client::TlsStream<TcpStream>;

    /// A server stream with `cert` and a tokio-rustls client that trusts
    /// `trusted`, over loopback TCP.
    async fn pair(
        cert: &SelfSigned,
        trusted: &SelfSigned,
    ) -> (io::Result<TlsStream>, io::Result<Client>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let config = trusted.client_config().expect("client config");
        let client = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
            TlsConnector::from(config).connect(name, tcp).await
        };
        let server = async {
            let (tcp, _) = listener.accept().await?;
            accept(cert.server_config().map_err(io::Error::other)?, tcp).await
        };
        let (server, client) = tokio::join!(server, client);
        (server, client)
    }

    async fn connected() -> (TlsStream, Client) {
        let cert = SelfSigned::generate(&["localhost".into()]).expect("certificate");
        let (server, client) = pair(&cert, &cert).await;
        (
            server.expect("server handshake"),
            client.expect("client handshake"),
        )
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Reads exactly `len` bytes in reads of at most 1 KiB (as tungstenite
    /// does), so that records larger than a read are kept in parts.
    async fn read_in_small_steps(r: &mut (impl AsyncReadExt + Unpin), len: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut buf = [0; 1024];
        while got.len() < len {
            let n = r.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream ended after {} of {len} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_at_once_whole_and_in_order() {
        let (server, mut client) = connected().await;
        let (mut server_rx, mut server_tx) = tokio::io::split(server);
        let up = pattern(3 << 20, 1);
        let down = pattern(3 << 20, 2);
        // The server writes small and large slices at once, as the
        // bridge's frame writer does.
        let serve = async {
            for chunk in down.chunks(70_000) {
                let (head, body) = chunk.split_at(7);
                let mut slices = [IoSlice::new(head), IoSlice::new(body)];
                let mut bufs = &mut slices[..];
                while !bufs.is_empty() {
                    let n = server_tx.write_vectored(bufs).await.expect("write");
                    IoSlice::advance_slices(&mut bufs, n);
                }
            }
            server_tx.flush().await.expect("flush");
            read_in_small_steps(&mut server_rx, up.len()).await
        };
        let (mut client_rx, mut client_tx) = tokio::io::split(&mut client);
        let call = async {
            client_tx.write_all(&up).await.expect("client write");
            client_tx.flush().await.expect("client flush");
            let mut got = vec![0; down.len()];
            client_rx.read_exact(&mut got).await.expect("client read");
            got
        };
        let both =
            tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(serve, call) });
        let (at_server, at_client) = both.await.expect("done within 60 s");
        assert!(at_server == up, "the server read what the client wrote");
        assert!(at_client == down, "the client read what the server wrote");
    }

    #[tokio::test]
    async fn an_idle_stream_holds_no_buffers() {
        let (mut server, mut client) = connected().await;
        let data = pattern(100_000, 3);
        client.write_all(&data).await.expect("client write");
        client.flush().await.expect("client flush");
        let got = read_in_small_steps(&mut server, data.len()).await;
        assert!(got == data);
        server.write_all(&data).await.expect("server write");
        server.flush().await.expect("server flush");
        let mut back = vec![0; data.len()];
        client.read_exact(&mut back).await.expect("client read");
        // Nothing more comes: the server's read waits, holding nothing.
        let mut buf = [0; 64];
        let waits = poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut buf);
            Poll::Ready(Pin::new(&mut server).poll_read(cx, &mut buf).is_pending())
        })
        .await;
        assert!(waits, "nothing was sent");
        let held = server.incoming.held() + server.plain.held() + server.outgoing.held();
        assert_eq!(held, 0, "bytes of buffer held while idle");
    }

    #[tokio::test]
    async fn reads_go_on_after_the_client_updates_its_keys() {
        let (mut server, mut client) = connected().await;
        for round in 0..3u8 {
            client
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
            let data = pattern(20_000, round);
            client.write_all(&data).await.expect("client write");
            client.flush().await.expect("client flush");
            assert!(read_in_small_steps(&mut server, data.len()).await == data);
            server.write_all(&data).await.expect("server write");
            server.flush().await.expect("server flush");
            let mut back = vec![0; data.len()];
            client.read_exact(&mut back).await.expect("client read");
            assert!(back == data, "round {round}");
        }
    }

    #[tokio::test]
    async fn a_close_notify_ends_reads_cleanly_both_ways() {
        let (mut server, mut client) = connected().await;
        client.write_all(b"last words").await.expect("client write");
        client.shutdown().await.expect("client close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("a clean end");
        assert_eq!(got, b"last words");
        server
            .write_all(b"goodbye")
            .await
            .expect("the server may still write");
        server.shutdown().await.expect("server close");
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .await
            .expect("a clean end, not a truncation");
        assert_eq!(back, b"goodbye");
    }

    #[tokio::test]
    async fn a_client_that_does_not_trust_the_certificate_fails_with_an_alert() {
        let cert = SelfSigned::generate(&["localhost".into()]).expect("certificate");
        let stranger = SelfSigned::generate(&["localhost".into()]).expect("certificate");
        let (server, client) = pair(&cert, &stranger).await;
        let client = client.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(client.contains("certificate"), "client: {client}");
        let server = server.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(server.contains("alert"), "server: {server}");
    }
}
