//! Helpers shared by the integration tests that run the real binary.
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

/// A child process killed when dropped, so a failed assertion leaves nothing running.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn tickvault() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tickvault"))
}

/// Runs a `tickvault` command that prints one JSON object: its exit code, the object
/// and its stderr (a panic with the stderr when stdout is not JSON).
pub fn json_output(command: &mut Command) -> (Option<i32>, serde_json::Value, String) {
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
    (out.status.code(), json, stderr)
}

/// `tickvault run` on `log` with `config`, against the simulator at `sim_addr` (its
/// WebSocket and REST both) with API key `key`; its output to nowhere until the caller
/// says otherwise.
pub fn run_command(config: &std::path::Path, log: &std::path::Path, sim_addr: &str, key: &str) -> Command {
    let mut command = tickvault();
    command
        .args(["run", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(log)
        .env("TICKVAULT_POLYGON_WS_URL", format!("ws://{sim_addr}"))
        .env("TICKVAULT_POLYGON_REST_URL", format!("http://{sim_addr}"))
        .env("TICKVAULT_POLYGON_API_KEY", key)
        // Daemons of tests running at once would all want the default port.
        .env("TICKVAULT_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// `tickvault simulate` on a free loopback port, ready to take connections.
pub fn simulator(extra: &[&str]) -> (Child, String) {
    simulator_with(tickvault(), extra)
}

/// The simulator at the lowest CPU priority: it stands in for Polygon, which does not
/// run on the appliance, so where CPU is measured it should not compete with it.
pub fn simulator_niced(extra: &[&str]) -> (Child, String) {
    let mut nice = Command::new("nice");
    nice.args(["-n", "19", env!("CARGO_BIN_EXE_tickvault")]);
    simulator_with(nice, extra)
}

fn simulator_with(mut command: Command, extra: &[&str]) -> (Child, String) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let child = Child(
        command
            .args(["simulate", "--listen", &addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return (child, addr);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the simulator did not start on {addr}");
}

pub mod sinks;
