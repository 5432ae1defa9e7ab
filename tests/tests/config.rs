//! Configuration as a new operator meets it, through the binaries: `genconfig` output
//! that runs, errors that name the key, the bad value, a likely fix and where the value
//! came from, `OUTPOST_*` variables, and a second process on a locked data dir.

use std::process::{Command, Output};

use anyhow::{ensure, Result};
use outpost_tests::{bin, Edge};

fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut c = Command::new(bin(name)?);
    c.args(args).env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    Ok(c.output()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn genconfig_runs_as_written_and_errors_say_what_to_fix() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("edge.toml");
    let path = file.to_string_lossy().to_string();

    // genconfig's output passes checkconfig (it carries a fresh secret).
    let g = run("outpost-edge", &["genconfig"], &[])?;
    ensure!(g.status.success());
    std::fs::write(&file, &g.stdout)?;
    let c = run("outpost-edge", &["checkconfig", &path], &[])?;
    ensure!(c.status.success(), "{}", text(&c.stderr));

    // A variable that is no configuration key: a warning, still ok.
    let c = run(
        "outpost-edge",
        &["checkconfig", &path],
        &[("OUTPOST_BOGUS", "1")],
    )?;
    ensure!(
        c.status.success() && text(&c.stderr).contains("OUTPOST_BOGUS is not a configuration key"),
        "{}",
        text(&c.stderr)
    );
    // One inside a section is a key: a bad value names the variable and the value.
    let c = run(
        "outpost-edge",
        &["checkconfig", &path],
        &[("OUTPOST_LIMITS__SEND_QUEUE", "abc")],
    )?;
    let err = text(&c.stderr);
    ensure!(
        !c.status.success()
            && err.contains("limits.send_queue")
            && err.contains("\"abc\"")
            && err.contains("OUTPOST_LIMITS__SEND_QUEUE"),
        "{err}"
    );
    ensure!(
        !err.contains("backtrace") && err.lines().count() <= 3,
        "{err}"
    );

    // An unknown key in the file: "did you mean", and the file.
    std::fs::write(
        &file,
        "[auth]\nallow_anonymous = true\n[limits]\nmax_conections = 10\n",
    )?;
    let c = run("outpost-edge", &["checkconfig", &path], &[])?;
    let err = text(&c.stderr);
    ensure!(
        !c.status.success()
            && err.contains("did you mean `max_connections`")
            && err.contains(&path),
        "{err}"
    );
    // A TOML syntax error names the file and the line.
    std::fs::write(&file, "listen = \n")?;
    let c = run("outpost-edge", &["checkconfig", &path], &[])?;
    let err = text(&c.stderr);
    ensure!(
        !c.status.success() && err.contains(&path) && err.contains("line 1"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_second_edge_on_a_locked_data_dir_fails_before_saying_it_listens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let first = Edge::start(dir.path(), "")?;
    // The same configuration (same data dir), another port.
    let cfg = std::fs::read_to_string(dir.path().join("edge.toml"))?;
    let second = dir.path().join("second.toml");
    std::fs::write(&second, cfg)?;
    let out = run(
        "outpost-edge",
        &["--config", &second.to_string_lossy()],
        &[("OUTPOST_LISTEN", "127.0.0.1:0")],
    )?;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    ensure!(
        !out.status.success(),
        "a second edge ran on a locked data dir"
    );
    ensure!(
        !stdout.contains("listening on"),
        "said it listens: {stdout}"
    );
    ensure!(
        stderr.contains("error:") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    drop(first);
    Ok(())
}
