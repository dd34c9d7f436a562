//! The `mqlb` binary's command line: config validation exit codes and messages.
//! (Building this test also builds the `mqlb` binary that the end-to-end
//! tests in `tests/` run as a process.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn mqlb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mqlb"))
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mqlb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn config_check_accepts_a_valid_file() {
    let p = write(
        "ok.toml",
        "[[listener]]\naddress = \"127.0.0.1:1883\"\n[[backend]]\nname = \"b1\"\naddress = \"127.0.0.1:1884\"\n",
    );
    let out = mqlb().args(["config", "check"]).arg(&p).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 listener(s), 1 backend(s))"));
}

#[test]
fn config_check_names_key_and_line_and_exits_64() {
    let p = write(
        "bad.toml",
        "[[listener]]\naddress = \"127.0.0.1:1883\"\n\n[[backend]]\nname = \"b1\"\naddress = \"no-port\"\n\n[balancer]\nconnect_timeout = \"soon\"\n",
    );
    let out = mqlb().args(["config", "check"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:6: backend[0].address"), "{err}");
    assert!(
        err.contains("bad.toml:9: balancer.connect_timeout"),
        "{err}"
    );
}

#[test]
fn balance_with_bad_flags_exits_64_before_binding() {
    let out = mqlb()
        .args([
            "balance",
            "--listen",
            "not-an-address",
            "--backend",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listener[0].address"));
}

#[test]
fn shipped_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mqlb.toml");
    let out = mqlb().args(["config", "check", path]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 listener(s), 3 backend(s))"));
}

/// At start-up the balancer raises its soft open-file limit to the hard
/// limit, as HAProxy does, and warns with the numbers when
/// `max_connections` cannot fit.
#[test]
fn balance_raises_the_open_file_limit_and_warns_when_it_is_short() {
    use std::io::{BufRead, BufReader};
    let p = write(
        "fds.toml",
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[backend]]\nname = \"b1\"\naddress = \"127.0.0.1:1\"\n\
         [balancer]\nmax_connections = 1000000000000\n[health]\nenabled = false\n",
    );
    // Start it with a low soft limit, as most systems do.
    let mut child = Command::new("sh")
        .args([
            "-c",
            "ulimit -Sn 256 && exec \"$0\" balance --config \"$1\"",
            env!("CARGO_BIN_EXE_mqlb"),
        ])
        .arg(&p)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut warning = None;
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(10)) {
        if line.contains("file descriptors") {
            warning = Some(line);
            break;
        }
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.expect("no open-file warning");
    assert!(
        warning.contains("max_connections = 1000000000000 needs 2000000000065"),
        "{warning}"
    );
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(open_files.len(), 2, "{limits}");
    assert_eq!(
        open_files[0], open_files[1],
        "soft limit not raised: {limits}"
    );
}

/// `mqlb config check` reports a rule an earlier one shadows, and a pool
/// that nothing reaches, naming key and line.
#[test]
fn config_check_reports_shadowed_rules_and_unreachable_pools() {
    let p = write(
        "rules.toml",
        "[[listener]]\naddress = \"127.0.0.1:1883\"\n\
         [[backend]]\nname = \"a1\"\naddress = \"127.0.0.1:1884\"\npool = \"a\"\n\
         [[backend]]\nname = \"z1\"\naddress = \"127.0.0.1:1885\"\npool = \"z\"\n\
         [[rule]]\npool = \"a\"\nsource_cidr = \"10.0.0.0/8\"\n\
         [[rule]]\npool = \"a\"\nsource_cidr = \"10.1.0.0/16\"\n",
    );
    let out = mqlb().args(["config", "check"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rules.toml:16: rule[1].source_cidr: can never match: rule[0]"),
        "{err}"
    );
    assert!(
        err.contains("pool z: no rule sends clients to this pool"),
        "{err}"
    );
}
