//! The .deb as an operator meets it, on this machine (root, dpkg): `scripts/package.sh`
//! builds it (`scripts/test.sh` does, before the tests). Installed, its files, modes,
//! conffiles, user and unit are checked; the installed binary, as the `tickvault` user
//! with no capabilities, captures from the simulator into /var/lib/tickvault; installed
//! again over itself, the log and an edited config stay; purged, the config and the
//! user go and the log stays. The machine is left as it was found.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tickvault_wal::{Lane, Wal};

mod common;

use common::{simulator, Child};

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = sh(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn the_package() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|_| {
            panic!(
                "no {}: run scripts/package.sh first (scripts/test.sh does)",
                dir.display()
            )
        })
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop()
        .expect("no .deb: run scripts/package.sh first (scripts/test.sh does)")
}

/// (owner, group, mode) of `path`.
fn stat(path: &str) -> (String, String, String) {
    let out = ok("stat", &["-c", "%U %G %a", path]);
    let mut parts = out.split_whitespace().map(str::to_owned);
    (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
}

fn exists(entry: &str, db: &str) -> bool {
    sh("getent", &[db, entry]).status.success()
}

#[test]
fn the_package_installs_runs_as_its_user_upgrades_and_purges_keeping_the_log() {
    let root = sh("id", &["-u"]);
    assert_eq!(
        String::from_utf8_lossy(&root.stdout).trim(),
        "0",
        "this test installs a package: run it as root"
    );
    let deb = the_package();
    let deb = deb.to_str().unwrap();
    let state = Path::new("/var/lib/tickvault");
    let state_was_there = state.exists();
    // A package left by an earlier run goes first (its log, if any, stays).
    if sh("dpkg-query", &["-W", "tickvault"]).status.success() {
        ok("dpkg", &["--purge", "tickvault"]);
    }

    // Installed: files, modes, conffiles, user and group.
    ok("dpkg", &["-i", deb]);
    assert!(exists("tickvault", "passwd") && exists("tickvault", "group"));
    assert_eq!(
        stat("/var/lib/tickvault"),
        ("tickvault".into(), "tickvault".into(), "750".into())
    );
    assert_eq!(
        stat("/etc/default/tickvault"),
        ("root".into(), "root".into(), "600".into())
    );
    assert_eq!(stat("/etc/tickvault/tickvault.toml").2, "644");
    assert_eq!(stat("/usr/bin/tickvault").2, "755");
    // The alert rules (with their tests, so an operator can run promtool on them) and
    // the dashboard, as shipped.
    for f in ["alerts.yml", "alerts.test.yml", "dashboard.json"] {
        let installed = format!("/usr/share/tickvault/{f}");
        assert_eq!(stat(&installed).2, "644", "{installed}");
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging").join(f);
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(shipped).unwrap(),
            "{installed}"
        );
    }
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "tickvault"]);
    for f in ["/etc/tickvault/tickvault.toml", "/etc/default/tickvault"] {
        assert!(conffiles.contains(f), "{f} is not a conffile: {conffiles}");
    }
    let unit = "/usr/lib/systemd/system/tickvault.service";
    let unit_text = std::fs::read_to_string(unit).unwrap();
    for line in [
        "Type=notify",
        "User=tickvault",
        "ExecStartPre=/usr/bin/tickvault validate",
        "EnvironmentFile=-/etc/default/tickvault",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/tickvault",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit_text.contains(line), "the unit lacks {line:?}");
    }
    assert!(
        !unit_text.contains("TICKVAULT_POLYGON_API_KEY="),
        "a secret in the unit"
    );
    let verify = ok("systemd-analyze", &["verify", unit]);
    assert!(verify.trim().is_empty(), "systemd-analyze verify: {verify}");
    let security = ok("systemd-analyze", &["security", "--offline=true", unit]);
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("Overall exposure level for tickvault.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure in: {security}"));
    assert!(exposure <= 2.0, "exposure {exposure}");
    ok(
        "/usr/bin/tickvault",
        &["validate", "--config", "/etc/tickvault/tickvault.toml"],
    );

    // The installed binary as its user, without capabilities or new privileges,
    // captures into the package's state directory.
    let (_sim, addr) = simulator(&["--always-open"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\ndata_dir = \"/var/lib/tickvault/log\"\n[polygon]\nws_url = \"ws://{addr}\"\nrest_url = \"http://{addr}\"\n\
             [live.crypto]\nsymbols = [\"BTC-USD\"]\nchannels = [\"XQ\"]\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut daemon = Child(
        Command::new("setpriv")
            .args([
                "--reuid=tickvault",
                "--regid=tickvault",
                "--init-groups",
                "--no-new-privs",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "env",
                "-i",
                "PATH=/usr/bin:/bin",
                "TICKVAULT_POLYGON_API_KEY=pkg-test",
                "/usr/bin/tickvault",
                "run",
                "--config",
            ])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(3));
    ok("kill", &["-TERM", &daemon.0.id().to_string()]);
    assert!(daemon.0.wait().unwrap().success(), "the daemon did not stop cleanly");
    let captured = Wal::open_read_only("/var/lib/tickvault/log")
        .unwrap()
        .last_seq(Lane::Live)
        .unwrap()
        .unwrap_or(0);
    assert!(captured > 0, "nothing captured into /var/lib/tickvault");
    assert_eq!(stat("/var/lib/tickvault/log").0, "tickvault");

    // Installed again over itself: an edited config and the log stay.
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string("/etc/tickvault/tickvault.toml").unwrap()
    );
    std::fs::write("/etc/tickvault/tickvault.toml", &edited).unwrap();
    ok("dpkg", &["-i", deb]);
    assert_eq!(
        std::fs::read_to_string("/etc/tickvault/tickvault.toml").unwrap(),
        edited
    );
    let after = Wal::open_read_only("/var/lib/tickvault/log")
        .unwrap()
        .last_seq(Lane::Live)
        .unwrap();
    assert_eq!(after, Some(captured), "the upgrade touched the log");

    // Purged: the config and the user go, the log stays, and it says so.
    let purge = ok("dpkg", &["--purge", "tickvault"]);
    assert!(!Path::new("/etc/tickvault").exists(), "the config outlived the purge");
    assert!(!Path::new("/etc/default/tickvault").exists());
    assert!(
        !exists("tickvault", "passwd") && !exists("tickvault", "group"),
        "the user outlived the purge"
    );
    assert!(
        Path::new("/var/lib/tickvault/log").exists(),
        "the purge removed the log"
    );
    assert!(
        purge.contains("left in place"),
        "the purge did not say the log stays: {purge}"
    );

    if !state_was_there {
        std::fs::remove_dir_all(state).unwrap();
    }
}
