//! `tickvault run` and `tickvault simulate`: long-running services stopped by a signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use futures_util::StreamExt;

use crate::config::Config;
use crate::daemon;
use crate::sim::{self, SimOptions};

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub fn load_config(path: &Path, data_dir: Option<PathBuf>) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    if let Some(dir) = data_dir {
        config.log.data_dir = dir;
    }
    Ok(config)
}

/// Resolves at each SIGHUP, and never where there is none. Its default action ends the
/// process at once: systemd's reload and a closed terminal send it, and neither should
/// stop capture. Once this is made, SIGHUP no longer ends the process.
fn hangups() -> impl futures_util::Stream<Item = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => futures_util::stream::poll_fn(move |cx| hup.poll_recv(cx)).left_stream(),
            Err(e) => {
                tracing::warn!(error = %e, "could not handle SIGHUP: it will end the daemon");
                futures_util::stream::pending().right_stream()
            }
        }
    }
    #[cfg(not(unix))]
    futures_util::stream::pending()
}

/// Tells systemd `state` when it started us with a notify socket (a failure to is
/// logged: the daemon runs on, and systemd's own timeout says the rest).
fn notify(state: sd_notify::NotifyState<'_>) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(false, &[state]) {
            tracing::warn!(error = %e, "telling systemd the daemon's state failed");
        }
    }
}

pub async fn run(config_path: &Path, data_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path, data_dir)?;
    // Before anything is created: a run that cannot capture leaves no log directory.
    config.check_api_key(&config_path.display().to_string())?;
    config.warn_of_clear_text();
    let mut hangup = hangups();
    let mut running = daemon::start(&config).await?;
    tracing::info!(
        data_dir = %config.log.data_dir.display(),
        live_feeds = running.live.len(),
        backfill = running.backfill.is_some(),
        "tickvault running"
    );
    // systemd (Type=notify): started once the log is open and the sources and runners
    // run, so `systemctl start` returns when capture has begun, or fails.
    notify(sd_notify::NotifyState::Ready);
    let signal = stop_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => {
                tracing::info!("stop signal: shutting down");
                notify(sd_notify::NotifyState::Stopping);
                break;
            }
            Some(()) = hangup.next() => {
                tracing::warn!("SIGHUP ignored: the configuration is read at start; restart to apply a change");
            }
            ended = running.join_next() => match ended {
                Some(Ok(part)) => tracing::info!(part, "finished"),
                Some(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "a part failed: shutting down");
                    running.shutdown().await?;
                    return Err(e);
                }
                None => break,
            },
        }
    }
    // A second signal stops at once: the log is synced (nothing acknowledged is lost),
    // and what was in flight to the sinks goes again at the next start.
    let wal = running.wal.clone();
    tokio::select! {
        stopped = running.shutdown() => stopped?,
        _ = stop_signal() => {
            tracing::warn!("second stop signal: stopping now; what was in flight to the sinks goes again at the next start");
            wal.shutdown().await?;
            tracing::info!("log synced; stopped at once");
            std::process::exit(1);
        }
    }
    tracing::info!("log synced; stopped");
    Ok(ExitCode::SUCCESS)
}

pub async fn simulate(options: SimOptions, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let handle = sim::spawn(listen, options.clone()).await?;
    eprintln!(
        "simulating Polygon on {} (seed {}, {}): WebSocket {}/forex|/crypto|/stocks, REST {}/v2/aggs/...",
        handle.addr,
        options.seed,
        if options.api_key.is_some() {
            "one key accepted"
        } else {
            "any non-empty key"
        },
        handle.ws_url(),
        handle.rest_url()
    );
    stop_signal().await;
    handle.stop().await?;
    Ok(ExitCode::SUCCESS)
}
