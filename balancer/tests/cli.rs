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
