//! The guest's serial console: shown live, split into lines for the harness.

use std::sync::mpsc;

use super::EXIT_MARKER;

/// Copies the guest console to stdout as it arrives (so test output shows live) and sends each
/// complete line to the caller. Serial line ends are CRLF; the CRs are dropped for logs. The
/// kernel's power-off messages and all that follows the exit marker are noise and not shown.
pub(super) fn forward_console(
    mut from: impl std::io::Read,
    mut to: impl std::io::Write,
    lines: &mpsc::Sender<String>,
) {
    let mut buf = [0u8; 8192];
    // The current line, and how much of it was already shown.
    let mut line: Vec<u8> = Vec::new();
    let mut shown_upto = 0;
    let mut muted = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        for &b in buf.iter().take(n).filter(|&&b| b != b'\r') {
            line.push(b);
            if b != b'\n' {
                continue;
            }
            let text = String::from_utf8_lossy(line.get(..line.len() - 1).unwrap_or_default())
                .into_owned();
            if !muted && !is_power_off_noise(&text) {
                out.extend_from_slice(line.get(shown_upto..).unwrap_or_default());
            }
            muted |= text.trim_start().starts_with(EXIT_MARKER);
            let _ignored = lines.send(text);
            line.clear();
            shown_upto = 0;
        }
        // A partial line shows at once (libtest prints "test x ... " before the verdict),
        // except kernel messages, which wait to be filtered as whole lines.
        if !muted && !line.starts_with(b"[") {
            out.extend_from_slice(line.get(shown_upto..).unwrap_or_default());
            shown_upto = line.len();
        }
        // Console output is best effort: a closed stdout must not stop the marker detection.
        let _ignored = to.write_all(&out).and_then(|()| to.flush());
    }
    if !line.is_empty() {
        let _ignored = lines.send(String::from_utf8_lossy(&line).into_owned());
    }
}

/// `[    8.731464] sysrq: Power Off` and `reboot: Power down`, printed by the guest's
/// power-off, sometimes before the exit marker has drained from the serial line.
fn is_power_off_noise(line: &str) -> bool {
    let Some((_, message)) = line
        .trim_start()
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    else {
        return false;
    };
    matches!(message.trim(), "sysrq: Power Off" | "reboot: Power down")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_off_noise_is_recognised() {
        assert!(is_power_off_noise("[    8.731464] sysrq: Power Off"));
        assert!(is_power_off_noise("[   16.0] reboot: Power down"));
        assert!(!is_power_off_noise("test result: ok. sysrq: Power Off"));
        assert!(!is_power_off_noise("[    5.6] Kernel panic - not syncing"));
    }

    #[test]
    fn console_lines_are_split_and_shown_without_cr() {
        let (tx, rx) = mpsc::channel();
        let input: &[u8] = b"a\r\nBUILDCAGE-VM-EXIT=3\r\n[ 1.0] sysrq: Power Off\r\ntail";
        let mut shown = Vec::new();
        forward_console(input, &mut shown, &tx);
        drop(tx);
        let lines: Vec<String> = rx.iter().collect();
        assert_eq!(
            lines,
            [
                "a",
                "BUILDCAGE-VM-EXIT=3",
                "[ 1.0] sysrq: Power Off",
                "tail"
            ]
        );
        // Nothing after the marker is shown.
        assert_eq!(String::from_utf8_lossy(&shown), "a\nBUILDCAGE-VM-EXIT=3\n");
    }
}
