//! `probe daemon-enter SOCKET TREE`: a client of `buildcage daemon` that
//! speaks the protocol by hand and tries to get processes other than its own
//! child into its build. Prints one line per attempt: `self entered|refused`,
//! `grandchild entered|refused`, `child entered|refused`, then `ended`.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
};

fn send(stream: &mut UnixStream, msg: &serde_json::Value) -> Option<()> {
    let body = serde_json::to_vec(msg).ok()?;
    let len = u32::try_from(body.len()).ok()?.to_be_bytes();
    stream.write_all(&len).ok()?;
    stream.write_all(&body).ok()
}

fn recv(stream: &mut UnixStream) -> Option<serde_json::Value> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; usize::try_from(u32::from_be_bytes(len)).ok()?];
    stream.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// "entered" or "refused", by the reply's type.
fn verdict(reply: Option<serde_json::Value>) -> &'static str {
    match reply.as_ref().and_then(|r| r["type"].as_str()) {
        Some("entered") => "entered",
        Some("error") => "refused",
        _ => "no-reply",
    }
}

/// Asks to enter from a process `depth` forks below this one, and prints
/// the verdict under `label`.
fn enter_from(stream: &mut UnixStream, depth: u32, label: &str) -> Option<()> {
    if depth == 0 {
        send(stream, &serde_json::json!({"type": "enter"}))?;
        println!("{label} {}", verdict(recv(stream)));
        return Some(());
    }
    let _ = std::io::stdout().flush();
    // SAFETY: the probe is single-threaded; the child only talks on the
    // socket, prints and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = enter_from(stream, depth - 1, label).is_some();
        let _ = std::io::stdout().flush();
        // SAFETY: leave the forked child without running the parent's exit.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    Some(())
}

pub(crate) fn run(socket: &str, tree: &str) -> Option<()> {
    let mut stream = UnixStream::connect(socket).ok()?;
    send(
        &mut stream,
        &serde_json::json!({"type": "hello", "version": 1}),
    )?;
    recv(&mut stream)?;
    let request = serde_json::json!({"type": "create", "request": {
        "tree": tree, "policy": "default", "set": [], "allow_write": [],
        "name": "enter-attack", "home": null, "tmpdir": null, "terminals": [],
    }});
    send(&mut stream, &request)?;
    let created = recv(&mut stream)?;
    if created["type"] != "created" {
        println!("create {created}");
        return None;
    }
    // The client itself is not its child; nor is a grandchild.
    enter_from(&mut stream, 0, "self")?;
    enter_from(&mut stream, 2, "grandchild")?;
    // Its own child may.
    enter_from(&mut stream, 1, "child")?;
    send(&mut stream, &serde_json::json!({"type": "finish"}))?;
    loop {
        let reply = recv(&mut stream)?;
        if reply["type"] == "ended" {
            println!("ended");
            return Some(());
        }
    }
}
