//! PostgreSQL: a cluster made with `initdb` in the run's temp dir, `postgres` run
//! directly (as the `postgres` user when the driver is root: PostgreSQL refuses root),
//! and a hand-written client for the part of the frontend/backend protocol (version 3)
//! the comparison needs: startup with trust authentication, simple queries for the
//! schema, and one prepared `INSERT ... ON CONFLICT DO NOTHING` run with
//! Bind/Execute/Sync per operation, as a pooled driver with a statement cache does.
//!
//! `fsync=on` and `synchronous_commit=on` (both PostgreSQL's defaults, set explicitly):
//! a commit returns after its WAL record is flushed to disk.

use crate::load::Outcome;
use crate::procs::{command_as, euid, free_port, run, user_ids, Procs};
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub const INSERT: &str = "INSERT INTO kv(k, v) VALUES ($1, $2) ON CONFLICT DO NOTHING";
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS kv (k text PRIMARY KEY, v bytea NOT NULL)";
/// Largest backend message accepted.
const MAX_MESSAGE: usize = 1 << 20;
const STATEMENT: &str = "put_if_absent";
/// Type OIDs of the statement's parameters: text, bytea.
const PARAM_TYPES: [u32; 2] = [25, 17];

/// The directory holding PostgreSQL's programs (`initdb`, `postgres`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("postgres").exists())
                .collect()
        })
        .unwrap_or_default();
    // The newest major version (directories are named by it).
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .context("PostgreSQL not found under /usr/lib/postgresql (apt-get install postgresql)")
}

/// `initdb`, start `postgres`, create the table; returns its address.
pub async fn start(procs: &mut Procs) -> anyhow::Result<String> {
    let bin = bin_dir()?;
    let user = if euid() == Some(0) {
        Some("postgres")
    } else {
        None
    };
    let home = procs.path("pg");
    std::fs::create_dir_all(&home)?;
    if let Some(u) = user {
        let (uid, gid) = user_ids(u)?;
        // The postgres user must reach its directory through the run's temp dir.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(procs.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::os::unix::fs::chown(&home, Some(uid), Some(gid))?;
    }
    let data = home.join("data");
    let mut initdb = command_as(user, &bin.join("initdb"));
    initdb.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--no-locale",
    ]);
    run(initdb).context("initdb")?;
    let port = free_port()?;
    let mut cmd = command_as(user, &bin.join("postgres"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string()])
        .arg("-k")
        .arg(&home)
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "fsync=on"])
        .args(["-c", "synchronous_commit=on"])
        .args(["-c", "full_page_writes=on"])
        .args(["-c", "max_connections=100"]);
    // Fast shutdown: roll back open transactions, checkpoint, exit.
    procs.spawn("postgres", cmd, "INT")?;
    let addr = format!("127.0.0.1:{port}");
    let a = addr.clone();
    crate::procs::wait_ready("postgres", procs, Duration::from_secs(60), || {
        let a = a.clone();
        async move {
            let mut c = Conn::connect(&a).await?;
            c.simple_query(SCHEMA).await
        }
    })
    .await?;
    Ok(addr)
}

pub struct Conn {
    addr: String,
    io: BufReader<TcpStream>,
    out: Vec<u8>,
    body: Vec<u8>,
}

impl Conn {
    /// Connect, authenticate (trust) and prepare the insert.
    pub async fn connect(addr: &str) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("postgres {addr}"))?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            addr: addr.to_string(),
            io: BufReader::new(s),
            out: Vec::with_capacity(512),
            body: Vec::with_capacity(512),
        };
        c.startup().await?;
        Ok(c)
    }

    /// Connect and prepare the insert: a worker's connection.
    pub async fn open(addr: &str) -> anyhow::Result<Conn> {
        let mut c = Conn::connect(addr).await?;
        c.prepare().await?;
        Ok(c)
    }

    pub async fn reconnect(&mut self) -> anyhow::Result<()> {
        *self = Conn::open(&self.addr).await?;
        Ok(())
    }

    async fn startup(&mut self) -> anyhow::Result<()> {
        let mut params = Vec::new();
        for (k, v) in [
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", "idem-compare"),
        ] {
            cstr(&mut params, k);
            cstr(&mut params, v);
        }
        params.push(0);
        self.out.clear();
        self.out
            .extend_from_slice(&(8 + params.len() as u32).to_be_bytes());
        self.out.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
        self.out.extend_from_slice(&params);
        self.io.get_mut().write_all(&self.out).await?;
        loop {
            match self.message().await? {
                b'R' => {
                    let code = u32::from_be_bytes(self.body[..4].try_into()?);
                    if code != 0 {
                        bail!("postgres asks for authentication method {code}; the comparison runs it with trust");
                    }
                }
                b'Z' => return Ok(()),
                b'E' => bail!("postgres: {}", error_text(&self.body)),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    /// Run `sql` with the simple-query protocol, ignoring any rows.
    pub async fn simple_query(&mut self, sql: &str) -> anyhow::Result<()> {
        self.out.clear();
        let mut body = Vec::new();
        cstr(&mut body, sql);
        frame(&mut self.out, b'Q', &body);
        self.io.get_mut().write_all(&self.out).await?;
        self.until_ready().await
    }

    /// Parse the insert once, as a named statement.
    pub async fn prepare(&mut self) -> anyhow::Result<()> {
        let mut body = Vec::new();
        cstr(&mut body, STATEMENT);
        cstr(&mut body, INSERT);
        body.extend_from_slice(&(PARAM_TYPES.len() as u16).to_be_bytes());
        for oid in PARAM_TYPES {
            body.extend_from_slice(&oid.to_be_bytes());
        }
        self.out.clear();
        frame(&mut self.out, b'P', &body);
        frame(&mut self.out, b'S', &[]);
        self.io.get_mut().write_all(&self.out).await?;
        self.until_ready().await
    }

    /// Read messages up to ReadyForQuery; the first error among them fails the call.
    async fn until_ready(&mut self) -> anyhow::Result<()> {
        let mut err = None;
        loop {
            match self.message().await? {
                b'Z' => break,
                b'E' => err = err.or(Some(error_text(&self.body))),
                _ => {}
            }
        }
        match err {
            Some(e) => bail!("postgres: {e}"),
            None => Ok(()),
        }
    }

    /// The prepared insert: Bind (both parameters in binary format), Execute, Sync, in
    /// one write. `INSERT 0 1`: stored; `INSERT 0 0`: the key existed.
    pub async fn insert(&mut self, key: &str, value: &[u8]) -> anyhow::Result<Outcome> {
        self.out.clear();
        let mut body = Vec::with_capacity(64 + key.len() + value.len());
        cstr(&mut body, ""); // unnamed portal
        cstr(&mut body, STATEMENT);
        body.extend_from_slice(&1u16.to_be_bytes()); // one format code for all parameters:
        body.extend_from_slice(&1u16.to_be_bytes()); // binary
        body.extend_from_slice(&2u16.to_be_bytes());
        for p in [key.as_bytes(), value] {
            body.extend_from_slice(&(p.len() as u32).to_be_bytes());
            body.extend_from_slice(p);
        }
        body.extend_from_slice(&0u16.to_be_bytes()); // result columns: none to format
        frame(&mut self.out, b'B', &body);
        body.clear();
        cstr(&mut body, "");
        body.extend_from_slice(&0u32.to_be_bytes()); // all rows
        frame(&mut self.out, b'E', &body);
        frame(&mut self.out, b'S', &[]);
        self.io.get_mut().write_all(&self.out).await?;
        let mut tag = None;
        let mut err = None;
        loop {
            match self.message().await? {
                b'C' => tag = Some(String::from_utf8_lossy(&self.body).into_owned()),
                b'E' => err = err.or(Some(error_text(&self.body))),
                b'Z' => break,
                _ => {} // BindComplete, notices
            }
        }
        if let Some(e) = err {
            bail!("postgres: {e}");
        }
        match tag.as_deref().map(|t| t.trim_end_matches('\0')) {
            Some("INSERT 0 1") => Ok(Outcome::Created),
            Some("INSERT 0 0") => Ok(Outcome::Existed),
            t => bail!("unexpected command tag {t:?}"),
        }
    }

    /// One backend message: its type; its body is left in `self.body`.
    async fn message(&mut self) -> anyhow::Result<u8> {
        let kind = self.io.read_u8().await?;
        let len = self.io.read_u32().await? as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            bail!("postgres message {:?} of {len} bytes", kind as char);
        }
        self.body.resize(len - 4, 0);
        self.io.read_exact(&mut self.body).await?;
        Ok(kind)
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// The severity and message fields of an ErrorResponse.
fn error_text(body: &[u8]) -> String {
    let mut severity = "";
    let mut message = "";
    for field in body.split(|b| *b == 0) {
        let Some((&code, text)) = field.split_first() else {
            continue;
        };
        let text = std::str::from_utf8(text).unwrap_or("?");
        match code {
            b'S' => severity = text,
            b'M' => message = text,
            _ => {}
        }
    }
    format!("{severity} {message}")
}
