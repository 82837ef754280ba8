//! A delaying TCP proxy: emulated WAN latency between regions on loopback.
//!
//! Every chunk read on one side is written to the other side `one_way` later, in order,
//! so a request/response round trip through the proxy takes `2 * one_way` more than
//! direct, while throughput is not limited (chunks in flight overlap). Aborting the
//! proxy's task drops every connection it carries.

use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Chunks in flight in one direction of one connection; a full queue stops the reader
/// (TCP back-pressure), it never grows without bound.
const MAX_CHUNKS_IN_FLIGHT: usize = 4096;
const CHUNK_BYTES: usize = 64 * 1024;

/// Listen on `listen` and forward every connection to `target`.
pub async fn spawn(
    listen: SocketAddr,
    target: SocketAddr,
    one_way: Duration,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("proxy listen {listen}"))?;
    Ok(tokio::spawn(async move {
        // Owned by this task: aborting it aborts every connection.
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((inbound, _)) = accepted else { continue };
                    conns.spawn(serve(inbound, target, one_way));
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    }))
}

async fn serve(inbound: TcpStream, target: SocketAddr, one_way: Duration) {
    let Ok(Ok(outbound)) =
        tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target)).await
    else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    // Either direction ending closes the other: dropping the halves closes the sockets.
    tokio::select! {
        _ = delayed_pipe(ri, wo, one_way) => {}
        _ = delayed_pipe(ro, wi, one_way) => {}
    }
}

/// Copy one direction, each chunk released `delay` after it was read.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(MAX_CHUNKS_IN_FLIGHT);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    // The writer drains what the reader queued before the reader saw the end.
    tokio::join!(reader, writer);
}

/// The round trip the emulation really gives (median of `rounds` small request/response
/// exchanges with an echo server through a proxy of `one_way`), under the same runtime
/// and timers as the proxies between regions: the figure a geo row's latency is read
/// against.
pub async fn measured_round_trip_ms(one_way: Duration, rounds: usize) -> anyhow::Result<f64> {
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let target = echo.local_addr()?;
    let echo_task = tokio::spawn(async move {
        let Ok((mut s, _)) = echo.accept().await else {
            return;
        };
        let _ = s.set_nodelay(true);
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let proxy = spawn(listen, target, one_way).await?;
    let result = async {
        let mut c = TcpStream::connect(listen).await?;
        c.set_nodelay(true)?;
        let msg = [0x5au8; 200];
        let mut got = [0u8; 200];
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds.max(1) {
            let t = std::time::Instant::now();
            c.write_all(&msg).await?;
            c.read_exact(&mut got).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        anyhow::Ok(times[times.len() / 2])
    }
    .await;
    proxy.abort();
    echo_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round trip through the proxy takes at least twice the one-way delay, and the
    /// bytes arrive whole and in order.
    #[tokio::test]
    async fn delays_each_direction_and_keeps_order() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let proxy = spawn(listen, target, Duration::from_millis(20))
            .await
            .unwrap();
        let mut c = TcpStream::connect(listen).await.unwrap();
        c.set_nodelay(true).unwrap();
        for round in 0..3u8 {
            let msg: Vec<u8> = (0..200).map(|i| (i as u8).wrapping_add(round)).collect();
            let t = std::time::Instant::now();
            c.write_all(&msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).await.unwrap();
            let rtt = t.elapsed();
            assert_eq!(got, msg);
            assert!(rtt >= Duration::from_millis(40), "round trip {rtt:?}");
            assert!(rtt < Duration::from_millis(1000), "round trip {rtt:?}");
        }
        proxy.abort();
    }

    #[tokio::test]
    async fn measured_round_trip_is_at_least_the_emulated_one() {
        let ms = measured_round_trip_ms(Duration::from_millis(10), 5)
            .await
            .unwrap();
        assert!((20.0..1000.0).contains(&ms), "round trip {ms} ms");
    }
}
