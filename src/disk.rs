//! The log's disk: a full disk is an alert, not an outage.
//!
//! `log.disk_reserve` is free space kept for what must go on when capture cannot:
//! forwarding (cursors), truncation, and opening the log again (RocksDB writes a new
//! manifest and flushes its write-ahead files when it opens). A watch reads the log's
//! filesystem twice a second: under twice the reserve the backfill's capture pauses,
//! under the reserve live capture stops too (the collectors disconnect, which records
//! the suspected gap the backfill repairs); both resume by themselves once truncation
//! has given space back. Nothing acknowledged is touched.
//!
//! A ballast file beside the log (`<data_dir>.ballast`, up to 128 MiB) is made while
//! there is room and given up first when the log is opened on a disk without the
//! reserve, so that a daemon restarted on a full disk opens its log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

pub use tickvault_core::config::reserve::{Reserve, MIN_RESERVE};

/// What capture may do, as the disk allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Room {
    /// Free space under twice the reserve: the backfill's capture waits.
    pub backfill_paused: bool,
    /// Free space under the reserve: live capture stops too.
    pub capture_stopped: bool,
}

/// (free for unprivileged users, size) of the filesystem holding `path`, in bytes.
pub fn filesystem(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into the zeroed struct passed; `c` is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        let unit = s.f_frsize as u64;
        Some((s.f_bavail as u64 * unit, s.f_blocks as u64 * unit))
    }
}

/// The ballast file of the log at `data_dir`: beside it, on the same filesystem.
pub fn ballast_path(data_dir: &Path) -> PathBuf {
    let name = data_dir
        .file_name()
        .map_or_else(|| "log".into(), |n| n.to_string_lossy().into_owned());
    data_dir.with_file_name(format!("{name}.ballast"))
}

/// The ballast's size for a reserve of `reserve` bytes.
pub fn ballast_bytes(reserve: u64) -> u64 {
    (reserve / 2).min(128 << 20)
}

/// The directory to measure: the log's, or its parent before it exists.
fn measured(data_dir: &Path) -> PathBuf {
    if data_dir.exists() {
        data_dir.to_owned()
    } else {
        data_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned()
    }
}

/// Before the log is opened: on a disk without the reserve, the ballast goes first, so
/// that RocksDB has room to recover.
pub fn before_open(data_dir: &Path, reserve: Reserve) {
    let ballast = ballast_path(data_dir);
    let Some((free, size)) = filesystem(&measured(data_dir)) else {
        return;
    };
    if free < reserve.bytes(size) && ballast.exists() {
        match std::fs::remove_file(&ballast) {
            Ok(()) => tracing::warn!(
                free,
                ballast = %ballast.display(),
                "free space under log.disk_reserve: ballast given up to open the log"
            ),
            Err(e) => tracing::error!(ballast = %ballast.display(), error = %e, "could not give up the ballast"),
        }
    }
}

/// Makes the ballast file, its blocks allocated (not a sparse file).
fn make_ballast(path: &Path, bytes: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let partial = path.with_extension("ballast.partial");
    let file = std::fs::File::create(&partial)?;
    // SAFETY: posix_fallocate only reads its integer arguments and the open descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes as libc::off_t) };
    if rc != 0 {
        drop(file);
        let _ = std::fs::remove_file(&partial);
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

/// How often the filesystem is read.
const EVERY: Duration = Duration::from_millis(500);

/// While the disk is short, how often the log's memtables are flushed: RocksDB keeps a
/// write-ahead file until every column family in it has flushed, and with capture
/// paused nothing else makes them flush, so truncation alone would not give back the
/// write-ahead files' space (up to `MAX_WAL_BYTES`).
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// Resuming takes a tenth of the reserve more than stopping: no flapping.
fn margin(reserve: u64) -> u64 {
    (reserve / 10).max(1 << 20)
}

/// What capture may do with `free` bytes against a reserve of `r`, coming from `was`;
/// each change is logged.
fn judge(was: Room, free: u64, r: u64) -> Room {
    let mut room = was;
    if !was.capture_stopped && free < r {
        room.capture_stopped = true;
        tracing::error!(
            free,
            reserve = r,
            "free space under log.disk_reserve: live capture stopped (forwarding and truncation go on; capture resumes when space comes back)"
        );
    } else if was.capture_stopped && free >= r + margin(r) {
        room.capture_stopped = false;
        tracing::warn!(
            free,
            reserve = r,
            "free space back above log.disk_reserve: live capture resumes"
        );
    }
    if !was.backfill_paused && free < 2 * r {
        room.backfill_paused = true;
        tracing::warn!(
            free,
            reserve = r,
            "free space under twice log.disk_reserve: backfill capture paused"
        );
    } else if was.backfill_paused && free >= 2 * r + margin(r) {
        room.backfill_paused = false;
        tracing::info!(
            free,
            reserve = r,
            "free space back above twice log.disk_reserve: backfill capture resumes"
        );
    }
    room
}

/// Watches the log's filesystem until `shutdown`; the receiver says what capture may do.
pub fn watch(
    data_dir: PathBuf,
    reserve: Reserve,
    wal: tickvault_wal::Wal,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<Room>, impl std::future::Future<Output = ()>) {
    // What the disk allows from the start: a restart on a full disk stays stopped.
    let first = filesystem(&data_dir).map_or(Room::default(), |(free, size)| {
        judge(Room::default(), free, reserve.bytes(size))
    });
    let (tx, rx) = watch::channel(first);
    let task = async move {
        let ballast = ballast_path(&data_dir);
        let mut flushed_at: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let Some((free, size)) = filesystem(&data_dir) else {
                continue;
            };
            let r = reserve.bytes(size);
            let was = *tx.borrow();
            let room = judge(was, free, r);
            if room != was {
                let _ = tx.send(room);
            }
            if room.backfill_paused && flushed_at.is_none_or(|t| t.elapsed() >= FLUSH_EVERY) {
                flushed_at = Some(tokio::time::Instant::now());
                let wal = wal.clone();
                match tokio::task::spawn_blocking(move || wal.flush_memtables()).await {
                    Ok(Ok(())) => tracing::debug!("log memtables flushed to release write-ahead files"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "flushing the log's memtables failed"),
                    Err(e) => tracing::warn!(error = %e, "flushing the log's memtables panicked"),
                }
            }
            let bytes = ballast_bytes(r);
            if bytes > 0 && !room.backfill_paused && free >= 2 * r + bytes + margin(r) && !ballast.exists() {
                match make_ballast(&ballast, bytes) {
                    Ok(()) => {
                        tracing::info!(ballast = %ballast.display(), bytes, "ballast made: given up first to reopen the log on a full disk")
                    }
                    Err(e) => tracing::warn!(ballast = %ballast.display(), error = %e, "could not make the ballast"),
                }
            }
        }
    };
    (rx, task)
}

/// Resolves once `room` lets `allowed` hold (at once if it does), or at `shutdown`.
pub async fn until(
    room: &mut watch::Receiver<Room>,
    allowed: impl Fn(&Room) -> bool,
    shutdown: &mut watch::Receiver<bool>,
) {
    loop {
        if allowed(&room.borrow_and_update()) || *shutdown.borrow() {
            return;
        }
        tokio::select! {
            changed = room.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_is_a_size_or_a_share() {
        assert_eq!(Reserve::try_from("2GiB".to_owned()), Ok(Reserve::Bytes(2 << 30)));
        assert_eq!(Reserve::try_from("500 MB".to_owned()), Ok(Reserve::Bytes(500_000_000)));
        assert_eq!(Reserve::try_from("5%".to_owned()), Ok(Reserve::Share(0.05)));
        assert_eq!(Reserve::Share(0.05).bytes(100 << 30), 5 << 30);
        assert_eq!(Reserve::Share(0.05).bytes(1 << 30), MIN_RESERVE);
        for bad in ["0%", "60%", "x%", "lots", "2 PiB", "16MiB"] {
            assert!(Reserve::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ballast_sits_beside_the_log() {
        assert_eq!(
            ballast_path(Path::new("/var/lib/tickvault/log")),
            Path::new("/var/lib/tickvault/log.ballast")
        );
        assert_eq!(
            ballast_path(Path::new("demo-data/log/")),
            Path::new("demo-data/log.ballast")
        );
        assert_eq!(ballast_bytes(1 << 30), 128 << 20);
        assert_eq!(ballast_bytes(MIN_RESERVE), 128 << 20);
    }
}
