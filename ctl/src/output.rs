//! Output shaped like git's: when to colour (`--color`, `NO_COLOR`, a terminal) and when to page
//! long output (`SPARK_PAGER`, then `PAGER`, then `less -FRX`, only onto a terminal).

use std::io::Write;
use std::process::{Command, Stdio};

/// The `--color` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when standard output is a terminal and `NO_COLOR` is unset.
    #[default]
    Auto,
    Always,
    Never,
}

/// The pager used when neither `SPARK_PAGER` nor `PAGER` names one; `-F` quits at once when
/// the text fits on one screen, `-R` passes colours, `-X` leaves the text on screen, as git does.
pub const DEFAULT_PAGER: &str = "less -FRX";

/// Whether to colour: an explicit `always`/`never` wins, as with git; `auto` colours a terminal
/// unless `NO_COLOR` is set to anything non-empty (no-color.org).
pub fn use_color(choice: ColorChoice, stdout_is_terminal: bool, no_color: Option<&str>) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => stdout_is_terminal && no_color.is_none_or(str::is_empty),
    }
}

/// The pager command line for output going to standard output, or `None` for none: only onto a
/// terminal, and an empty or `cat` pager means no pager, as with git.
pub fn pager_command(
    stdout_is_terminal: bool,
    var: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    if !stdout_is_terminal {
        return None;
    }
    let chosen = var("SPARK_PAGER")
        .or_else(|| var("PAGER"))
        .unwrap_or_else(|| DEFAULT_PAGER.to_owned());
    let chosen = chosen.trim();
    (!chosen.is_empty() && chosen != "cat").then(|| chosen.to_owned())
}

/// Why paging did not work: the caller then writes to standard output itself.
#[derive(Debug, thiserror::Error)]
#[error("cannot run the pager {command:?}: {source}")]
pub struct PagerError {
    command: String,
    source: std::io::Error,
}

/// Feed `bytes` to `command` (run by `sh -c`, as git runs pagers) and wait until the user quits
/// it. Quitting before the end is success. `LESS` gets git's `FRX` when the user set none.
pub fn page(command: &str, bytes: &[u8]) -> Result<(), PagerError> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command).stdin(Stdio::piped());
    if std::env::var_os("LESS").is_none() {
        cmd.env("LESS", "FRX");
    }
    let fail = |source| PagerError {
        command: command.to_owned(),
        source,
    };
    let mut child = cmd.spawn().map_err(fail)?;
    if let Some(mut stdin) = child.stdin.take() {
        match stdin.write_all(bytes) {
            Ok(()) => {}
            // The user quit the pager before reading everything.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                let _ = child.wait();
                return Err(fail(e));
            }
        }
    }
    let status = child.wait().map_err(fail)?;
    // The shell's "command not found": nothing was shown, so the caller prints it instead.
    if status.code() == Some(127) {
        return Err(fail(std::io::Error::other("command not found")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn colour_follows_the_flag_then_no_color_then_the_terminal() {
        use ColorChoice::*;
        assert!(use_color(Always, false, Some("1")));
        assert!(!use_color(Never, true, None));
        assert!(use_color(Auto, true, None));
        assert!(!use_color(Auto, false, None));
        assert!(!use_color(Auto, true, Some("1")));
        assert!(
            use_color(Auto, true, Some("")),
            "an empty NO_COLOR is unset"
        );
    }

    #[test]
    fn the_pager_is_spark_pager_then_pager_then_less_and_only_on_a_terminal() {
        let env = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| m.get(k).cloned()
        };
        assert_eq!(pager_command(true, env(&[])).as_deref(), Some("less -FRX"));
        assert_eq!(
            pager_command(true, env(&[("PAGER", "more")])).as_deref(),
            Some("more")
        );
        assert_eq!(
            pager_command(true, env(&[("PAGER", "more"), ("SPARK_PAGER", "most -s")])).as_deref(),
            Some("most -s")
        );
        assert_eq!(pager_command(true, env(&[("SPARK_PAGER", "cat")])), None);
        assert_eq!(
            pager_command(true, env(&[("SPARK_PAGER", ""), ("PAGER", "more")])),
            None
        );
        assert_eq!(pager_command(false, env(&[("SPARK_PAGER", "more")])), None);
    }
}
