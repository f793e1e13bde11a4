//! The TLS 1.3 record layer after the handshake, in user space: what kernel TLS does, where
//! the kernel cannot (RFC 8446 §5.2–5.3, AES-GCM with ring).
//!
//! rustls runs the handshake and the key schedule; it then exports each direction's key, IV
//! and sequence number (as for kernel TLS) and the records are sealed and opened here, straight
//! between guest memory and one bounded buffer per direction: one copy and the cipher each
//! way, where rustls's buffered API makes three or four copies and reads 4 KiB at a time. The
//! wire format is standard TLS 1.3 (tested against rustls itself).
//!
//! Send and receive have separate state and locks: a reader never waits for a writer.

use std::io::{self, Read, Write};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

use crate::channel::Stream;

/// Most plaintext bytes in one record.
const MAX_PLAIN: usize = 1 << 14;
/// Most ciphertext bytes in one record (the peer may pad up to 255 bytes).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
const APPDATA: u8 = 0x17;
const ALERT: u8 = 0x15;
/// AES-GCM's limit of records under one key (2^24.5, RFC 8446 §5.5): beyond it a connection
/// would need a key update, which this layer does not do yet, so it ends with an error.
const MAX_RECORDS: u64 = 23_726_566;
/// The ciphertext buffered per direction before it is written (and read at once).
pub const BUFFER: usize = 256 << 10;

/// One direction's key, IV and next sequence number.
pub(super) struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    pub(super) fn new(seq: u64, secret: ConnectionTrafficSecrets) -> Result<Keys, String> {
        let (alg, key, iv) = match &secret {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            _ => return Err("a cipher other than AES-GCM was negotiated".into()),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| "a malformed TLS key")?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| "a malformed TLS IV")?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of the next record (the IV XOR the sequence number), and advances.
    fn next(&mut self) -> io::Result<Nonce> {
        if self.seq >= MAX_RECORDS {
            return Err(io::Error::other(
                "TLS: this connection reached AES-GCM's record limit (about 362 GiB one way)",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// The sending side: records built in `out`, written when it fills.
pub(super) struct Sealer {
    keys: Keys,
    out: Vec<u8>,
    /// Where the open record's header starts (`None`: no record open).
    open: Option<usize>,
}

impl Sealer {
    pub(super) fn new(keys: Keys) -> Sealer {
        Sealer {
            keys,
            out: Vec::with_capacity(BUFFER + MAX_CIPHER),
            open: None,
        }
    }

    /// Appends `len` bytes at `ptr` as application data, writing full buffers to `sock`.
    ///
    /// # Safety
    /// `ptr` must be readable for `len` bytes for the duration of the call.
    pub(super) unsafe fn push(
        &mut self,
        sock: &Stream,
        ptr: *const u8,
        len: usize,
    ) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let start = match self.open {
                Some(s) => s,
                None => {
                    let s = self.out.len();
                    self.out.extend_from_slice(&[APPDATA, 3, 3, 0, 0]);
                    self.open = Some(s);
                    s
                }
            };
            let room = MAX_PLAIN - (self.out.len() - start - HEADER);
            let n = room.min(len - done);
            let at = self.out.len();
            self.out.reserve(n);
            // Copied with a raw pointer: the source may be guest memory being written.
            // `ptr + done .. ptr + done + n` is inside the caller's readable range; `out` has
            // room for `n` more bytes (reserved), which `set_len` then covers.
            // SAFETY: both ranges valid as said, and they do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr.add(done), self.out.as_mut_ptr().add(at), n);
                self.out.set_len(at + n);
            }
            done += n;
            if n == room {
                self.close(APPDATA)?;
                if self.out.len() >= BUFFER {
                    self.flush(sock)?;
                }
            }
        }
        Ok(())
    }

    /// Seals the open record, its content being of `kind`.
    fn close(&mut self, kind: u8) -> io::Result<()> {
        let Some(start) = self.open.take() else {
            return Ok(());
        };
        self.out.push(kind);
        let len = self.out.len() - start - HEADER + TAG;
        self.out[start + 3..start + 5].copy_from_slice(&(len as u16).to_be_bytes());
        let mut aad = [0u8; HEADER];
        aad.copy_from_slice(&self.out[start..start + HEADER]);
        let nonce = self.keys.next()?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut self.out[start + HEADER..])
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Seals what is open and writes everything out.
    pub(super) fn flush(&mut self, mut sock: &Stream) -> io::Result<()> {
        self.close(APPDATA)?;
        let r = sock.write_all(&self.out);
        self.out.clear();
        r
    }

    /// Sends `close_notify`.
    pub(super) fn close_notify(&mut self, sock: &Stream) -> io::Result<()> {
        self.close(APPDATA)?;
        // Encrypted records all say application data outside; the alert type is inside.
        self.out.extend_from_slice(&[APPDATA, 3, 3, 0, 0]);
        self.open = Some(self.out.len() - HEADER);
        self.out.extend_from_slice(&[1, 0]); // warning, close_notify
        self.close(ALERT)?;
        let mut s = sock;
        let r = s.write_all(&self.out);
        self.out.clear();
        r
    }
}

/// The receiving side: ciphertext read into `buf` in large reads, opened in place.
pub(super) struct Opener {
    keys: Keys,
    buf: Vec<u8>,
    /// Unopened ciphertext: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Opened plaintext not yet taken: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// The peer sent `close_notify`.
    closed: bool,
}

impl Opener {
    pub(super) fn new(keys: Keys) -> Opener {
        Opener {
            keys,
            buf: vec![0; BUFFER + MAX_CIPHER + HEADER],
            start: 0,
            end: 0,
            plain: (0, 0),
            closed: false,
        }
    }

    /// Copies up to `len` bytes of plaintext to `dst`: 0 at the end of the stream.
    ///
    /// # Safety
    /// `dst` must be writable for `len` bytes for the duration of the call.
    pub(super) unsafe fn take(
        &mut self,
        sock: &Stream,
        dst: *mut u8,
        len: usize,
    ) -> io::Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        while self.plain.0 == self.plain.1 {
            if self.closed || !self.open_next(sock)? {
                return Ok(0);
            }
        }
        let n = len.min(self.plain.1 - self.plain.0);
        // `dst` is writable for `len >= n` bytes (the caller's guarantee); the plaintext
        // range is inside `buf`, which does not overlap it.
        // SAFETY: both ranges valid as said.
        unsafe { std::ptr::copy_nonoverlapping(self.buf.as_ptr().add(self.plain.0), dst, n) };
        self.plain.0 += n;
        Ok(n)
    }

    /// Opens the next record (reading more when it is not all here); `false` at the end of
    /// the stream.
    fn open_next(&mut self, mut sock: &Stream) -> io::Result<bool> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {m}"));
        loop {
            let have = self.end - self.start;
            if have >= HEADER {
                let h = &self.buf[self.start..self.start + HEADER];
                let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
                if h[0] != APPDATA || h[1] != 3 || !(TAG + 1..=MAX_CIPHER).contains(&len) {
                    return Err(bad(format!(
                        "the peer sent a malformed record ({:02x?})",
                        h
                    )));
                }
                if have >= HEADER + len {
                    return self.open_record(len).map_err(bad).map(|()| true);
                }
            }
            // Make room: move the partial record to the front.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.end, self.start) = (self.end - self.start, 0);
            }
            let n = loop {
                match sock.read(&mut self.buf[self.end..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                return if self.end == 0 {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the peer closed the connection without close_notify",
                    ))
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the connection ended inside a record",
                    ))
                };
            }
            self.end += n;
        }
    }

    fn open_record(&mut self, len: usize) -> Result<(), String> {
        let mut aad = [0u8; HEADER];
        aad.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        let body = self.start + HEADER;
        let nonce = self.keys.next().map_err(|e| e.to_string())?;
        let plain_len = self
            .keys
            .key
            .open_in_place(nonce, Aad::from(aad), &mut self.buf[body..body + len])
            .map_err(|_| "a record failed authentication (tampered with, or not ours)")?
            .len();
        self.start = body + len;
        // The content type is the last non-zero byte (zeros after it are padding).
        let inner = &self.buf[body..body + plain_len];
        let Some(at) = inner.iter().rposition(|&b| b != 0) else {
            return Err("a record without a content type".into());
        };
        match inner[at] {
            APPDATA => {
                self.plain = (body, body + at);
                Ok(())
            }
            ALERT if at == 2 && inner[1] == 0 => {
                self.closed = true;
                self.plain = (0, 0);
                Ok(())
            }
            ALERT if at == 2 => Err(format!("the peer sent alert {}", inner[1])),
            other => Err(format!(
                "the peer sent a record of type {other} after the handshake (a key update or \
                 session ticket, which rdmig does not take)"
            )),
        }
    }
}
