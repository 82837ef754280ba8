//! Redis: one `redis-server` with the append-only file on, and a hand-written RESP2
//! client that sends `SET key value NX` (one connection per worker).
//!
//! `appendfsync always` fsyncs the AOF before a write is acknowledged (equal durability
//! with the others); `everysec` is the common production setting and is shown as a
//! second row: it acknowledges before the fsync and can lose the last second.

use crate::load::Outcome;
use crate::procs::{free_port, Procs};
use anyhow::{bail, Context};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest reply line accepted (status, error or bulk length).
const MAX_LINE: usize = 4096;

#[derive(Clone, Copy, Debug)]
pub enum Fsync {
    Always,
    EverySec,
}

impl Fsync {
    pub fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::EverySec => "everysec",
        }
    }
}

/// Start one Redis server; returns its address.
pub async fn start(procs: &mut Procs, fsync: Fsync) -> anyhow::Result<String> {
    let port = free_port()?;
    let dir = procs.path("redis");
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(&dir)
        .args(["--appendonly", "yes"])
        .args(["--appendfsync", fsync.as_str()])
        // The AOF is the durability; RDB snapshots off, so no fork lands in a run.
        .args(["--save", ""])
        .args(["--daemonize", "no"])
        .args(["--protected-mode", "yes"]);
    procs.spawn("redis", cmd, "TERM")?;
    let addr = format!("127.0.0.1:{port}");
    let a = addr.clone();
    crate::procs::wait_ready("redis", procs, Duration::from_secs(30), || {
        let a = a.clone();
        async move { Conn::connect(&a).await?.ping().await }
    })
    .await?;
    Ok(addr)
}

pub struct Conn {
    addr: String,
    io: BufReader<TcpStream>,
    /// Reused request buffer.
    out: Vec<u8>,
    line: String,
}

impl Conn {
    pub async fn connect(addr: &str) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("redis {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            addr: addr.to_string(),
            io: BufReader::new(s),
            out: Vec::with_capacity(256),
            line: String::new(),
        })
    }

    pub async fn reconnect(&mut self) -> anyhow::Result<()> {
        *self = Conn::connect(&self.addr).await?;
        Ok(())
    }

    async fn command(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.out
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.out.extend_from_slice(a);
            self.out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&self.out).await?;
        self.reply().await
    }

    async fn reply(&mut self) -> anyhow::Result<Reply> {
        self.line.clear();
        let n = (&mut self.io)
            .take(MAX_LINE as u64)
            .read_line(&mut self.line)
            .await?;
        if n == 0 {
            bail!("redis closed the connection");
        }
        let line = self.line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_at(1.min(line.len()));
        match kind {
            "+" => Ok(Reply::Status(rest.to_string())),
            "-" => bail!("redis: {rest}"),
            ":" => Ok(Reply::Status(rest.to_string())),
            "$" => {
                let len: i64 = rest.parse().context("bulk length")?;
                if len < 0 {
                    return Ok(Reply::Nil);
                }
                let mut body = vec![0u8; len as usize + 2];
                self.io.read_exact(&mut body).await?;
                body.truncate(len as usize);
                Ok(Reply::Bulk(body))
            }
            _ => bail!("unexpected redis reply {line:?}"),
        }
    }

    pub async fn ping(&mut self) -> anyhow::Result<()> {
        match self.command(&[b"PING"]).await? {
            Reply::Status(s) if s == "PONG" => Ok(()),
            r => bail!("PING answered {r:?}"),
        }
    }

    /// `SET key value NX`: `+OK` when stored, nil when the key exists.
    pub async fn set_nx(&mut self, key: &str, value: &[u8]) -> anyhow::Result<Outcome> {
        match self
            .command(&[b"SET", key.as_bytes(), value, b"NX"])
            .await?
        {
            Reply::Status(s) if s == "OK" => Ok(Outcome::Created),
            Reply::Nil => Ok(Outcome::Existed),
            r => bail!("SET NX answered {r:?}"),
        }
    }
}

#[derive(Debug)]
enum Reply {
    Status(String),
    Nil,
    // Never expected from SET NX; read whole so the connection stays in step.
    #[allow(dead_code)]
    Bulk(Vec<u8>),
}
