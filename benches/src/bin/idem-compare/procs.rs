//! The peers' processes: spawned with their output in a log file each, stopped with
//! their own graceful signal (then SIGKILL after a grace period) when the system's rows
//! are done, when a step fails, and when the driver unwinds (`Drop`). Also loopback
//! ports, running a command as another user, and waiting for readiness.

use anyhow::{bail, Context};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a peer has to exit after its graceful signal before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of a peer's log shown when it fails.
const LOG_TAIL_LINES: usize = 30;

struct Proc {
    name: String,
    child: Child,
    /// The signal that shuts this program down cleanly (`kill -s`).
    stop_signal: &'static str,
    log: PathBuf,
}

/// The processes of one system under test, and the directory holding their data and logs.
pub struct Procs {
    list: Vec<Proc>,
    pub dir: tempfile::TempDir,
}

impl Procs {
    pub fn new(system: &str) -> anyhow::Result<Procs> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("idem-compare-{system}-"))
            .tempdir()
            .context("temp dir")?;
        Ok(Procs {
            list: Vec::new(),
            dir,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Start `cmd` with stdout and stderr in `<dir>/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        mut cmd: Command,
        stop_signal: &'static str,
    ) -> anyhow::Result<()> {
        let log = self.path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        self.list.push(Proc {
            name: name.to_string(),
            child,
            stop_signal,
            log,
        });
        Ok(())
    }

    /// Fails, with the end of its log, if any process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.list {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited ({status}); end of {}:\n{}",
                    p.name,
                    p.log.display(),
                    log_tail(&p.log)
                );
            }
        }
        Ok(())
    }

    /// The end of every process's log (for an error report).
    pub fn logs(&self) -> String {
        self.list
            .iter()
            .map(|p| format!("--- {} ({})\n{}", p.name, p.log.display(), log_tail(&p.log)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Signal every process, wait for them (at most `STOP_GRACE` in all), kill the rest.
    pub fn stop_all(&mut self) {
        for p in &mut self.list {
            if let Ok(None) = p.child.try_wait() {
                let _ = Command::new("kill")
                    .args(["-s", p.stop_signal, &p.child.id().to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for mut p in self.list.drain(..) {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("  {} did not stop after {STOP_GRACE:?}: killed", p.name);
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// A free loopback port. Ports come from a per-process block below the kernel's
/// ephemeral range (32768+), so they never collide with the source ports of outgoing
/// connections; a port found busy is skipped.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 100) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        if p >= 32_000 {
            bail!("no free loopback port below the ephemeral range");
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
}

/// The effective user id of this process (from /proc, no libc needed).
pub fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `(uid, gid)` of a local user.
pub fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        if !out.status.success() {
            bail!("no user {user:?} on this machine");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// `program` as a command run by `user` when this process is root (PostgreSQL refuses to
/// run as root), or as is otherwise. `setpriv` execs the program: the child's pid is
/// the program's own, so signals reach it directly.
pub fn command_as(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                &format!("--regid={u}"),
                "--init-groups",
                "--",
            ])
            .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Run a command to completion, failing with its output.
pub fn run(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// First line of `program --version` (or of `program -v`), for the report.
pub fn version_of(program: &str, flag: &str) -> String {
    Command::new(program)
        .arg(flag)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Poll `probe` until it succeeds, failing after `timeout` with its last error. Between
/// tries, `procs` is checked so that a peer that died is reported at once.
pub async fn wait_ready<F, Fut>(
    what: &str,
    procs: &mut Procs,
    timeout: Duration,
    mut probe: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(5), probe()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "probe timed out".to_string(),
        };
        procs.check_alive()?;
        if start.elapsed() > timeout {
            bail!(
                "{what} not ready after {timeout:?}: {last}\n{}",
                procs.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
